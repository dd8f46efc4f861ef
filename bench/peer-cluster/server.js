'use strict';
// The tutorial's chat server as one process of a cluster, for bench/cluster.py:
// socket.io 4.8 with socket.io's Redis adapter (@socket.io/redis-adapter over the
// `redis` client), the way the tutorial's FAQ scales Socket.IO. A broadcast
// reaches the sockets of every process through Redis pub/sub.
//
// Protocol (the tutorial's):
//   client -> server: 'login' (name), 'chat' (message), 'onlineUsers' ()
//   server -> socket: 'welcome', 'loginNameBad' (name), 'loginNameExists' (name),
//                     'onlineUsers' (array of names)
//   server -> all:    'userJoined' (name), 'userLeft' (name), 'chat' ({sender, message})
//
// The tutorial keeps its user list in one process's memory; a cluster of
// processes would then accept one name once per process. Here the list is a
// Redis sorted set (score: the join order), so a name is unique across the
// cluster as it is on our server: ZADD NX decides a race between processes.
//
// Environment: PORT (default 8080), HOST (default 127.0.0.1), REDIS_URL
// (default redis://127.0.0.1:6379), NODE_NAME (shown in the log line).
const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');

const PORT = parseInt(process.env.PORT || '8080', 10);
const HOST = process.env.HOST || '127.0.0.1';
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const NODE_NAME = process.env.NODE_NAME || `pid${process.pid}`;
const USERS = 'chat:users'; // sorted set: name -> join order
const JOIN_SEQ = 'chat:joinseq';

function validName(name) {
  return typeof name === 'string' && name.length >= 3 && name.length <= 10;
}

async function main() {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  const data = pub.duplicate(); // the user list: kept off the adapter's connections
  for (const c of [pub, sub, data]) c.on('error', (e) => console.error(`${NODE_NAME} redis: ${e.message}`));
  await Promise.all([pub.connect(), sub.connect(), data.connect()]);

  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end('peer-cluster chat\n');
  });
  const io = new Server(server, { adapter: createAdapter(pub, sub) });

  io.on('connection', (socket) => {
    let username = null;
    let loggingIn = false;

    socket.on('login', async (name) => {
      if (username || loggingIn) return; // the tutorial ignores a second login too
      if (!validName(name)) {
        socket.emit('loginNameBad', name);
        return;
      }
      loggingIn = true;
      try {
        const seq = await data.incr(JOIN_SEQ);
        const added = await data.zAdd(USERS, { score: seq, value: name }, { NX: true });
        if (!added) {
          socket.emit('loginNameExists', name);
          return;
        }
        if (socket.disconnected) {
          await data.zRem(USERS, name); // gone while the name was being claimed
          return;
        }
        username = name;
        socket.emit('welcome');
        io.emit('userJoined', name);
      } catch (e) {
        console.error(`${NODE_NAME} login ${name}: ${e.message}`);
      } finally {
        loggingIn = false;
      }
    });

    socket.on('chat', (message) => {
      if (username && message) {
        io.emit('chat', { sender: username, message: message });
      }
    });

    socket.on('onlineUsers', async () => {
      try {
        socket.emit('onlineUsers', await data.zRange(USERS, 0, -1));
      } catch (e) {
        console.error(`${NODE_NAME} onlineUsers: ${e.message}`);
      }
    });

    socket.on('disconnect', async () => {
      if (!username) return;
      const name = username;
      username = null;
      try {
        await data.zRem(USERS, name);
      } catch (e) {
        console.error(`${NODE_NAME} logout ${name}: ${e.message}`);
      }
      io.emit('userLeft', name);
    });
  });

  server.listen(PORT, HOST, () => {
    console.error(`peer-cluster ${NODE_NAME} listening on ${HOST}:${PORT} (node ${process.version}, ` +
      `socket.io ${require('socket.io/package.json').version}, ` +
      `redis-adapter ${require('@socket.io/redis-adapter/package.json').version}, ${REDIS_URL})`);
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit(), data.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main().catch((e) => {
  console.error(`${NODE_NAME} failed to start: ${e.stack || e}`);
  process.exit(1);
});
