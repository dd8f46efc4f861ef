'use strict';
// The tutorial's client logic (public/js/socketclient.js of the seed), driven
// from Node with the real socket.io-client: default transports (long-polling,
// then the upgrade to WebSocket), no acknowledgements. Prints every event it
// receives as one JSON line, then exits.
//   node seed_client.js URL NAME MESSAGE [PEERS]
const { io } = require('socket.io-client');

const [url, name, message, peers] = process.argv.slice(2);
const expectPeers = parseInt(peers || '0', 10);
const log = (event, data) => process.stdout.write(JSON.stringify({ event, data }) + '\n');
const socket = io.connect(url, { reconnection: false, forceNew: true });
let chats = 0;

socket.on('connect', () => socket.emit('login', name));
socket.on('welcome', (data) => { log('welcome', data); socket.emit('onlineUsers'); });
socket.on('loginNameExists', (d) => { log('loginNameExists', d); socket.close(); });
socket.on('loginNameBad', (d) => { log('loginNameBad', d); socket.close(); });
socket.on('onlineUsers', (d) => { log('onlineUsers', d); socket.emit('chat', message); });
socket.on('userJoined', (d) => log('userJoined', d));
socket.on('userLeft', (d) => log('userLeft', d));
socket.on('chat', (d) => {
  log('chat', d);
  chats += 1;
  if (chats >= 1 + expectPeers) {
    log('transport', socket.io.engine.transport.name);
    socket.close();
  }
});
socket.on('disconnect', () => process.exit(0));
setTimeout(() => { log('timeout', null); process.exit(1); }, 15000);
