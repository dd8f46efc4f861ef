'use strict';
// Rooms scenario for bench/compare.py (issue 12): the same 1,000 logged-in
// clients chat first in the lobby (every chat reaches all of them), then in
// 20 rooms of 50 members (a chat reaches its room's 50 members), with the
// same sending policy in both phases: --m senders spread evenly over the
// rooms, each in a closed loop (--window chats outstanding, the next one sent
// on the sender's own echo). Both phases run on one server process, back to
// back, so their ratio is taken under the same conditions. Our server only:
// the tutorial's Node server has no rooms.
//
// Copied by compare.py next to the shared load generator (into the scratch
// copy of ../shared/bench/loadgen) to use the `ws` installed there by
// `npm ci`; no other dependency. Loopback only; every wait is bounded.
// Prints one JSON line on stdout.
//
// Per phase: deliveries/s, server CPU (utime+stime of --server-pid from
// /proc) per delivery and per chat, end-to-end latency (send time embedded in
// the message). By default the rooms phase sends --rooms times as many chats
// per sender as the lobby phase, so both phases make the same number of
// deliveries (each room chat reaches 1/--rooms of the clients).
//
// Checks (a failed check makes the run incomplete or lists an error): every
// client gets every chat of its scope exactly once and each sender's chats
// in the order sent; nothing from another room and no lobby chat during the
// rooms phase (nor room chats in the lobby phase); positions strictly
// increasing per client; every createRoom/joinRoom acknowledged ok; no
// protocolError.
const fs = require('fs');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

function parseArgs(argv) {
  const a = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error('bad args near ' + argv[i]);
    a[argv[i].slice(2)] = argv[i + 1];
  }
  return a;
}
const A = parseArgs(process.argv.slice(2));
const URL = A.url || 'http://127.0.0.1:8080';
if (!/^https?:\/\/(127\.\d+\.\d+\.\d+|localhost)(:\d+)?\/?$/.test(URL)) {
  console.error('refusing non-loopback url ' + URL);
  process.exit(2);
}
const N = parseInt(A.n || '1000', 10);
const ROOMS = parseInt(A.rooms || '20', 10);
const M = parseInt(A.m || '100', 10);
const LOBBY_K = parseInt(A['lobby-k'] || '5', 10);
const ROOMS_K = parseInt(A['rooms-k'] || String(LOBBY_K * ROOMS), 10);
const WARM = parseInt(A.warm || '3', 10);
const WINDOW = parseInt(A.window || '1', 10);
const SIZE = parseInt(A.size || '64', 10);
const LOGIN_CONC = parseInt(A['login-conc'] || '50', 10);
const JOIN_CONC = parseInt(A['join-conc'] || '50', 10);
const PHASE_TIMEOUT = parseFloat(A['timeout-s'] || '90') * 1000;
const PHASES = (A.phases || 'lobby,rooms').split(',').filter(Boolean);
const SERVER_PID = parseInt(A['server-pid'] || '0', 10);
const MAX_S = parseFloat(A['max-s'] || '240');
const LABEL = A.label || '';
const CLK_TCK = 100;
// --mark-window 1: SIGUSR1 to the server when a measured phase starts,
// SIGUSR2 when it ends (bench/profile_server.py --window-signals samples
// only between them). Never against a plain server: both signals kill it.
const MARK_WINDOW = A['mark-window'] === '1';
// Equal senders per room and equal members per room: every client of a phase
// expects the same number of chats, which the checks rely on.
if (N % ROOMS || M % ROOMS || M > N) throw new Error('--n and --m must be multiples of --rooms, --m <= --n');
for (const p of PHASES) if (!['lobby', 'rooms', 'all'].includes(p)) throw new Error('--phases takes lobby,rooms,all');

const now = () => performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const errors = [];
let errorCount = 0;
const noteError = (e) => { errorCount++; if (errors.length < 20) errors.push(e); };
let lastEvent = now();

const userName = (i) => 'b' + String(i).padStart(4, '0');
const roomOf = (i) => i % ROOMS; // senders 0..M-1 so land evenly on the rooms
const roomName = (r) => 'bench' + String(r).padStart(2, '0');
// Phase 'all' (a control, not run by default): one room whose members are
// all N clients, i.e. the lobby's audience reached by the rooms code path.
// Its CPU per delivery next to the lobby's isolates what a room costs per
// delivery from what 50 members instead of 1,000 cost per chat.
const ALL_ROOM = 'benchall';
const PAD = 'x'.repeat(Math.max(0, SIZE - 24));

// -- server CPU from /proc -----------------------------------------------------
function serverTimes() {
  // [user, system] CPU seconds of the server process, all its threads
  if (!SERVER_PID) return [NaN, NaN];
  try {
    const s = fs.readFileSync(`/proc/${SERVER_PID}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' '); // [11]=utime, [12]=stime
    return [parseInt(f[11], 10) / CLK_TCK, parseInt(f[12], 10) / CLK_TCK];
  } catch (e) { return [NaN, NaN]; }
}
function serverCpuS() { const [u, s] = serverTimes(); return u + s; }
function writeCalls() {
  // write-family system calls of the server (its socket writes): a room
  // chat's deliveries share a write per socket and batch only with the
  // same room's chats, so deliveries per write explain CPU per delivery
  try {
    const m = /^syscw: (\d+)$/m.exec(fs.readFileSync(`/proc/${SERVER_PID}/io`, 'utf8'));
    return m ? parseInt(m[1], 10) : NaN;
  } catch (e) { return NaN; }
}
function cpuSnap() {
  const [user, sys] = serverTimes();
  return { t: now(), srv: user + sys, sys, lg: process.cpuUsage(), syscw: writeCalls() };
}
function cpuDiff(a, b) {
  const wall = (b.t - a.t) / 1000;
  const srv = b.srv - a.srv;
  const lg = ((b.lg.user - a.lg.user) + (b.lg.system - a.lg.system)) / 1e6;
  return {
    wall_s: +wall.toFixed(3),
    server_cpu_s: +srv.toFixed(2), server_cpu_pct: +(100 * srv / wall).toFixed(1),
    server_sys_s: +(b.sys - a.sys).toFixed(2),
    loadgen_cpu_s: +lg.toFixed(2), loadgen_cpu_pct: +(100 * lg / wall).toFixed(1),
    server_write_syscalls: b.syscw - a.syscw,
  };
}
async function waitServerIdle(maxMs) {
  // idle: at most 0.02 CPU-s over 200 ms (the shared load generator's rule),
  // so one phase's leftovers (e.g. roomJoined fan-out) stay out of the next
  if (!SERVER_PID) { await sleep(300); return; }
  const t0 = now();
  let prev = serverCpuS();
  while (now() - t0 < maxMs) {
    await sleep(200);
    const cur = serverCpuS();
    if (cur - prev <= 0.02) return;
    prev = cur;
  }
}
async function waitQuiet(quietMs, maxMs) {
  const t0 = now();
  while (now() - lastEvent < quietMs && now() - t0 < maxMs) await sleep(20);
}
async function waitFor(pred, maxMs) {
  const t0 = now();
  while (!pred() && now() - t0 < maxMs) await sleep(5);
  return pred();
}
function stats(arr, n) {
  if (!n) return null;
  const s = Float64Array.from(arr.subarray(0, n)).sort();
  const q = (p) => s[Math.min(n - 1, Math.floor(p * n))];
  let total = 0;
  for (let i = 0; i < n; i++) total += s[i];
  const r = (x) => +x.toFixed(3);
  return { n, mean: r(total / n), p50: r(q(0.5)), p90: r(q(0.9)), p99: r(q(0.99)), max: r(s[n - 1]) };
}

// -- a raw Engine.IO v4 / Socket.IO v5 client over WebSocket -------------------
// The shared RawClient has neither acknowledgements nor events with two
// arguments, and the rooms protocol needs both (createRoom/joinRoom acks,
// `chat(message, {room})`).
class Client {
  constructor(index) {
    this.index = index;
    this.name = userName(index);
    this.h = Object.create(null);
    this.acks = new Map();
    this.nextAck = 0;
    this.connected = false;
    this.closed = false;
    const wsUrl = URL.replace(/^http/, 'ws').replace(/\/$/, '') + '/socket.io/?EIO=4&transport=websocket';
    this.ws = new WebSocket(wsUrl, { perMessageDeflate: false });
    this.ws.on('message', (data) => this._onMessage(typeof data === 'string' ? data : data.toString()));
    this.ws.on('error', (e) => this._fire('error', e.message));
    this.ws.on('close', () => {
      const was = this.connected;
      this.connected = false;
      if (was && !this.closed) this._fire('error', 'disconnected by the server');
    });
  }
  on(ev, fn) { this.h[ev] = fn; return this; }
  _fire(ev, a, b) { const f = this.h[ev]; if (f) f(a, b); }
  _onMessage(s) {
    const t = s.charCodeAt(0);
    if (t === 52 /* '4' message */) {
      const p = s.charCodeAt(1);
      if (p === 50 /* '2' EVENT */) {
        const arr = JSON.parse(s.slice(2));
        this._fire(arr[0], arr[1], arr[2]);
      } else if (p === 51 /* '3' ACK */) {
        const open = s.indexOf('[');
        const id = parseInt(s.slice(2, open), 10);
        const fn = this.acks.get(id);
        if (fn) { this.acks.delete(id); fn(JSON.parse(s.slice(open))[0]); }
      } else if (p === 48 /* '0' CONNECT */) {
        this.connected = true;
        this._fire('connect');
      } else if (p === 52 /* '4' CONNECT_ERROR */) {
        this._fire('error', 'connect_error ' + s.slice(2));
      } else if (p === 49 /* '1' DISCONNECT */) {
        this._fire('error', 'disconnected by the server (socket.io)');
        this.disconnect();
      }
    } else if (t === 50 /* '2' ping */) {
      this.ws.send('3');
    } else if (t === 48 /* '0' open */) {
      this.ws.send('40');
    } else if (t === 49 /* '1' close */) {
      this.ws.close();
    }
  }
  // args: the event's arguments after its name; ack: called with the answer
  emit(ev, args, ack) {
    if (this.ws.readyState !== 1) { noteError(`${this.name}: emit ${ev} on a closed socket`); return; }
    let id = '';
    if (ack) { id = String(this.nextAck++); this.acks.set(+id, ack); }
    this.ws.send('42' + id + JSON.stringify([ev, ...args]));
  }
  disconnect() {
    if (this.closed) return;
    this.closed = true;
    if (this.ws.readyState === 1) { this.ws.send('41'); this.ws.close(); } else this.ws.terminate();
  }
}

// -- one measured phase ----------------------------------------------------------
// scope 'lobby': `chat(message)`, delivered as `chat` to all N clients;
// scope 'rooms': `chat(message, {room})`, delivered as `roomChat` to the
// sender's room only; scope 'all': the same to the room of all N clients. Message: `<tag>|<sender>|<seq>|<send ms>|pad`.
class Phase {
  constructor(scope, tag, k, measured) {
    this.scope = scope;
    this.tag = tag;
    this.k = k;
    this.measured = measured;
    this.perClient = scope === 'rooms' ? (M / ROOMS) * k : M * k;
    this.expected = N * this.perClient;
    this.lats = measured ? new Float64Array(this.expected) : null;
    this.delivered = 0;
    this.tLast = 0;
    this.sent = new Int32Array(M);
    this.received = new Int32Array(N);
    this.lastSeq = Array.from({ length: N }, () => new Int32Array(M).fill(-1));
    this.fifo = 0; // a chat seen twice or out of its sender's order
    this.wrongScope = 0; // a chat of another room or kind reaching this client
    this.onEcho = null;
  }
  send(clients, j) {
    const seq = this.sent[j]++;
    const t = now();
    const msg = `${this.tag}|${j}|${seq}|${t.toFixed(3)}|${PAD}`;
    if (this.scope === 'lobby') clients[j].emit('chat', [msg]);
    else clients[j].emit('chat', [msg, { room: this.scope === 'all' ? ALL_ROOM : roomName(roomOf(j)) }]);
  }
  deliver(c, kind, payload, t) {
    const msg = payload && payload.message;
    if (typeof msg !== 'string') { noteError(`${kind} without a message`); return; }
    const p = msg.split('|', 4);
    if (p[0] !== this.tag) { this.wrongScope++; noteError(`${c.name}: ${kind} of another phase: ${msg.slice(0, 24)}`); return; }
    const sender = +p[1];
    const seq = +p[2];
    if (kind !== (this.scope === 'lobby' ? 'chat' : 'roomChat')
        || (this.scope === 'rooms' && (payload.room !== roomName(roomOf(c.index)) || roomOf(sender) !== roomOf(c.index)))
        || (this.scope === 'all' && payload.room !== ALL_ROOM)) {
      this.wrongScope++;
      noteError(`${c.name} (${roomName(roomOf(c.index))}): ${kind} from ${sender} room ${payload.room}`);
      return;
    }
    const last = this.lastSeq[c.index];
    if (seq <= last[sender]) { this.fifo++; return; }
    last[sender] = seq;
    this.received[c.index]++;
    if (this.measured) this.lats[this.delivered] = t - parseFloat(p[3]);
    this.delivered++;
    this.tLast = t;
    if (sender === c.index && this.onEcho) this.onEcho(sender);
  }
  missing() {
    let m = 0;
    for (let i = 0; i < N; i++) m += this.perClient - this.received[i];
    return m;
  }
}

// Closed loop over one phase; resolves when every delivery arrived or the
// phase timed out.
async function closedLoop(clients, ph, window) {
  ph.onEcho = (j) => { if (ph.sent[j] < ph.k) ph.send(clients, j); };
  for (let j = 0; j < M; j++) for (let w = 0; w < window && ph.sent[j] < ph.k; w++) ph.send(clients, j);
  const ok = await waitFor(() => ph.delivered >= ph.expected, PHASE_TIMEOUT);
  ph.onEcho = null;
  return ok;
}

function ackedAll(clients, indexes, event, argsOf, conc) {
  // one request per client in `indexes`, at most `conc` unanswered at a time
  return new Promise((resolve) => {
    let started = 0, finished = 0, failed = 0;
    const timer = setTimeout(() => {
      noteError(`${event}: ${indexes.length - finished} of ${indexes.length} unanswered`);
      resolve(failed + indexes.length - finished);
    }, PHASE_TIMEOUT);
    const next = () => {
      if (started >= indexes.length) return;
      const c = clients[indexes[started++]];
      c.emit(event, argsOf(c), (res) => {
        lastEvent = now();
        if (!res || res.ok !== true) { failed++; noteError(`${c.name} ${event}: ${JSON.stringify(res)}`); }
        if (++finished === indexes.length) { clearTimeout(timer); resolve(failed); } else next();
      });
    };
    if (!indexes.length) { clearTimeout(timer); resolve(0); return; }
    for (let k = 0; k < Math.min(conc, indexes.length); k++) next();
  });
}

async function runPhase(clients, scope, k, setPhase) {
  // warm-up (not measured): the code paths of this scope, closed loop
  if (WARM > 0) {
    const warm = new Phase(scope, 'w' + scope[0], WARM, false);
    setPhase(warm);
    if (!await closedLoop(clients, warm, 1)) noteError(`${scope} warm-up: ${warm.delivered} of ${warm.expected} delivered`);
    await waitQuiet(200, 10000);
  }
  await waitServerIdle(30000);
  const ph = new Phase(scope, scope[0], k, true);
  setPhase(ph);
  if (MARK_WINDOW) process.kill(SERVER_PID, 'SIGUSR1');
  const c0 = cpuSnap();
  const complete = await closedLoop(clients, ph, WINDOW);
  const c1 = cpuSnap();
  if (MARK_WINDOW) process.kill(SERVER_PID, 'SIGUSR2');
  const activeS = (ph.tLast - c0.t) / 1000;
  const cpu = cpuDiff(c0, { ...c1, t: ph.tLast || c1.t });
  const chats = M * k;
  await waitQuiet(200, 10000); // stragglers (duplicates, wrong scope) still get counted
  return {
    params: { k, chats, recipients_per_chat: scope === 'rooms' ? N / ROOMS : N },
    complete,
    delivered: ph.delivered,
    expected: ph.expected,
    active_s: +activeS.toFixed(3),
    deliveries_per_s: +(ph.delivered / activeS).toFixed(1),
    chats_per_s: +(ph.delivered / (ph.expected / chats) / activeS).toFixed(1),
    server_us_per_delivery: +(1e6 * cpu.server_cpu_s / ph.delivered).toFixed(3),
    server_us_per_chat: +(1e6 * cpu.server_cpu_s / chats).toFixed(1),
    deliveries_per_write: +(ph.delivered / cpu.server_write_syscalls).toFixed(2),
    latency_ms: stats(ph.lats, ph.delivered),
    cpu,
    checks: { missing: ph.missing(), duplicates_or_reordered: ph.fifo, wrong_scope: ph.wrongScope },
  };
}

async function main() {
  const clients = new Array(N);
  let phase = null;
  const setPhase = (p) => { phase = p; };
  const lastPos = new Float64Array(N).fill(-1);
  let posOrder = 0;
  let roomJoined = 0, roomCreated = 0;

  // connect and log in, LOGIN_CONC at a time (setup, not measured)
  const tSetup = now();
  await new Promise((resolve) => {
    let started = 0, finished = 0;
    const timer = setTimeout(() => { noteError(`login timeout: ${N - finished} of ${N} unanswered`); resolve(); }, PHASE_TIMEOUT);
    const finish = () => {
      if (++finished === N) { clearTimeout(timer); resolve(); } else startNext();
    };
    const startNext = () => {
      if (started >= N) return;
      const i = started++;
      const c = new Client(i);
      clients[i] = c;
      const onChat = (kind) => (m) => {
        const t = now();
        lastEvent = t;
        if (m && typeof m.position === 'number') {
          if (m.position <= lastPos[i]) posOrder++;
          lastPos[i] = m.position;
        }
        if (phase) phase.deliver(c, kind, m, t);
        else noteError(`${c.name}: ${kind} outside a phase`);
      };
      c.on('connect', () => c.emit('login', [c.name]));
      c.on('welcome', () => { lastEvent = now(); finish(); });
      c.on('loginNameBad', (x) => { noteError('loginNameBad ' + x); finish(); });
      c.on('loginNameExists', (x) => { noteError('loginNameExists ' + x); finish(); });
      c.on('protocolError', (x) => noteError(`${c.name} protocolError ${JSON.stringify(x)}`));
      c.on('error', (e) => { noteError(`${c.name}: ${e}`); if (!c.connected) finish(); });
      c.on('chat', onChat('chat'));
      c.on('roomChat', onChat('roomChat'));
      c.on('roomJoined', () => { lastEvent = now(); roomJoined++; });
      c.on('roomCreated', () => { lastEvent = now(); roomCreated++; });
    };
    for (let k = 0; k < Math.min(LOGIN_CONC, N); k++) startNext();
  });
  const out = { setup: { login_s: +((now() - tSetup) / 1000).toFixed(2) } };
  if (errorCount) return { ...out, error: 'login failed' };
  await waitQuiet(300, 30000);
  await waitServerIdle(60000);

  for (const scope of PHASES) {
    if (scope !== 'lobby') {
      // the first client of each room creates it, then the others join
      const t0 = now();
      const count = scope === 'rooms' ? ROOMS : 1;
      const nameOf = (c) => [{ room: scope === 'rooms' ? roomName(roomOf(c.index)) : ALL_ROOM }];
      roomJoined = 0;
      roomCreated = 0;
      const firsts = Array.from({ length: count }, (_, r) => r);
      const rest = Array.from({ length: N - count }, (_, x) => x + count);
      let bad = await ackedAll(clients, firsts, 'createRoom', nameOf, count);
      // joins into rooms that were not created would only fail (or hang) too
      if (!bad) bad = await ackedAll(clients, rest, 'joinRoom', nameOf, JOIN_CONC);
      await waitQuiet(300, 30000);
      // Every member sees its own and every later member's join:
      // sum over a room of 1..members.
      const per = N / count;
      out.setup[scope] = {
        seconds: +((now() - t0) / 1000).toFixed(2),
        roomJoined, roomJoined_expected: count * per * (per + 1) / 2,
        roomCreated, roomCreated_expected: count * N,
      };
      if (bad) { out.error = `${bad} createRoom/joinRoom refused or unanswered`; break; }
      await waitServerIdle(60000);
    }
    out[scope] = await runPhase(clients, scope, scope === 'rooms' ? ROOMS_K : LOBBY_K, setPhase);
    if (!out[scope].complete) break;
  }
  phase = null;
  for (const scope of ['rooms', 'all']) {
    if (out.lobby && out[scope]) {
      out[`${scope}_over_lobby`] = {
        server_us_per_delivery: +(out[scope].server_us_per_delivery / out.lobby.server_us_per_delivery).toFixed(3),
        deliveries_per_s: +(out[scope].deliveries_per_s / out.lobby.deliveries_per_s).toFixed(3),
      };
    }
  }
  out.position_order_violations = posOrder;
  for (const c of clients) if (c) c.disconnect();
  await sleep(300);
  return out;
}

const hard = setTimeout(() => {
  process.stdout.write(JSON.stringify({ label: LABEL, scenario: 'rooms', error: `hard timeout ${MAX_S} s`, errors: errorCount, first_errors: errors.slice(0, 5) }) + '\n');
  process.exit(3);
}, MAX_S * 1000);
main().then((r) => {
  clearTimeout(hard);
  const rec = {
    ts: new Date().toISOString(), label: LABEL, scenario: 'rooms',
    params: { n: N, rooms: ROOMS, m: M, lobby_k: LOBBY_K, rooms_k: ROOMS_K, warm: WARM, window: WINDOW, size: SIZE, phases: PHASES },
    ...r,
  };
  if (errorCount) { rec.errors = errorCount; rec.first_errors = errors.slice(0, 5); }
  process.stdout.write(JSON.stringify(rec) + '\n');
  process.exit(0);
}, (e) => {
  process.stdout.write(JSON.stringify({ label: LABEL, scenario: 'rooms', error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
