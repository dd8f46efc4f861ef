'use strict';
// Load generator for bench/cluster.py: clients split over several server
// processes. Copied by cluster.py next to the shared load generator (into the
// scratch copy of ../shared/bench/loadgen) so it can use the `ws` installed
// there by `npm ci`; it has no other dependency. Loopback only; every phase is
// bounded in time. Prints one JSON line on stdout.
//
// Client i connects to --urls[i % U]; clients 0..M-1 are the senders, so they
// alternate between the processes too. Every delivery is classified as
// same-process (the receiver's process is the sender's) or cross-process.
//
// Phases, on the same logged-in clients:
//   warm-up  closed loop, --warm chats per sender, not measured;
//   fixed    --rate chats/s per sender, --fixed-k each: latency;
//   closed   closed loop (next chat on the sender's own echo, --window
//            outstanding), --closed-k each: deliveries/s, CPU per delivery.
//
// Latencies, per delivery (ms):
//   send     the sender's emit to the receiver's receipt (any server);
//   commit   the chat's `time` (our server: recorded_at, taken in the append
//            transaction just before its INSERT and COMMIT; same host clock)
//            to the receipt (wall clock: performance.timeOrigin + now());
//   ack      the sender's receipt of the chat's acknowledgement (sent by our
//            server after the commit) to the receipt; negative when the
//            delivery came first.
// --acks 1 sends every chat with an acknowledgement request (our server);
// the tutorial's server has neither acks nor `time`, so only `send` applies.
//
// Checks per phase: every client got every chat exactly once; each sender's
// chats in the order sent (FIFO); the number of distinct delivery orders among
// the clients (1 when every client saw the same order); with --acks, the
// positions each client saw strictly increasing (the log's order).
//
// CPU: /proc/<pid>/stat of --server-pids (the chat processes) and of
// --aux-trees (a root and all its descendants: the PostgreSQL postmaster and
// its backends, or redis-server; a root's cutime+cstime keeps the CPU of
// children that exited during the phase).
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
const URLS = (A.urls || 'http://127.0.0.1:8080').split(',');
for (const u of URLS) {
  if (!/^https?:\/\/127\.\d+\.\d+\.\d+:\d+\/?$/.test(u)) {
    console.error('refusing non-loopback url ' + u);
    process.exit(2);
  }
}
const U = URLS.length;
const N = parseInt(A.n || '200', 10);
const M = parseInt(A.m || '10', 10);
const WARM = parseInt(A.warm || '10', 10);
const RATE = parseFloat(A.rate || '3');
const FIXED_K = parseInt(A['fixed-k'] || '30', 10);
const CLOSED_K = parseInt(A['closed-k'] || '100', 10);
const WINDOW = parseInt(A.window || '1', 10);
const SIZE = parseInt(A.size || '64', 10);
const ACKS = A.acks === '1';
const LOGIN_CONC = parseInt(A['login-conc'] || '20', 10);
const PHASE_TIMEOUT = parseFloat(A['timeout-s'] || '60') * 1000;
const MAX_S = parseFloat(A['max-s'] || '150');
const LABEL = A.label || '';
const ids = (s) => (s ? s.split(',').filter(Boolean).map((x) => parseInt(x, 10)) : []);
const SERVER_PIDS = ids(A['server-pids']);
// --mark-window 1: SIGUSR1 to every server process when the closed loop
// starts, SIGUSR2 when it ends (bench/profile_server.py --window-signals
// samples only between them). Never against a plain server: both kill it.
const MARK_WINDOW = A['mark-window'] === '1';
const markWindow = (sig) => { if (MARK_WINDOW) for (const pid of SERVER_PIDS) process.kill(pid, sig); };
const AUX_TREES = ids(A['aux-trees']);
const CLK_TCK = parseInt(A['clk-tck'] || '100', 10);
if (M > N) throw new Error('--m must not exceed --n');

const now = () => performance.now();
const wallMs = (t) => performance.timeOrigin + t;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const errors = [];
const noteError = (e) => { if (errors.length < 1000) errors.push(e); };
let lastEvent = now();

// -- CPU from /proc ----------------------------------------------------------
function statFields(pid) {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return s.slice(s.lastIndexOf(')') + 2).split(' '); // [0]=state, [1]=ppid, [11]=utime
  } catch (e) { return null; }
}
function ticks(f, withChildren) {
  let t = parseInt(f[11], 10) + parseInt(f[12], 10);
  if (withChildren) t += parseInt(f[13], 10) + parseInt(f[14], 10);
  return t;
}
function treeTicks(root) {
  const children = new Map();
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const f = statFields(name);
    if (!f) continue;
    const ppid = parseInt(f[1], 10);
    if (!children.has(ppid)) children.set(ppid, []);
    children.get(ppid).push([parseInt(name, 10), f]);
  }
  const rootF = statFields(root);
  if (!rootF) return NaN;
  let total = ticks(rootF, true);
  const stack = [root];
  while (stack.length) {
    for (const [pid, f] of children.get(stack.pop()) || []) {
      total += ticks(f, false);
      stack.push(pid);
    }
  }
  return total;
}
function writeCalls(pid) {
  // write-family system calls (write, writev...; libuv writes sockets with them)
  try {
    const m = /^syscw: (\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'));
    return m ? parseInt(m[1], 10) : NaN;
  } catch (e) { return NaN; }
}
function cpuSnap() {
  const per = {};
  let syscw = 0;
  for (const pid of SERVER_PIDS) {
    const f = statFields(pid);
    per[pid] = f ? ticks(f, false) : NaN;
    syscw += writeCalls(pid);
  }
  const aux = {};
  for (const pid of AUX_TREES) aux[pid] = treeTicks(pid);
  return { t: now(), per, aux, syscw, lg: process.cpuUsage() };
}
function sum(obj) { return Object.values(obj).reduce((a, b) => a + b, 0); }
function cpuDiff(a, b) {
  const wall = (b.t - a.t) / 1000;
  const srv = (sum(b.per) - sum(a.per)) / CLK_TCK;
  const aux = AUX_TREES.length ? (sum(b.aux) - sum(a.aux)) / CLK_TCK : 0;
  const lg = ((b.lg.user - a.lg.user) + (b.lg.system - a.lg.system)) / 1e6;
  const perPid = {};
  for (const pid of SERVER_PIDS) perPid[pid] = +((b.per[pid] - a.per[pid]) / CLK_TCK).toFixed(2);
  return {
    wall_s: +wall.toFixed(3),
    server_cpu_s: +srv.toFixed(2), server_cpu_pct: +(100 * srv / wall).toFixed(1),
    aux_cpu_s: +aux.toFixed(2), aux_cpu_pct: +(100 * aux / wall).toFixed(1),
    loadgen_cpu_s: +lg.toFixed(2), loadgen_cpu_pct: +(100 * lg / wall).toFixed(1),
    server_cpu_s_per_pid: perPid,
    server_write_syscalls: b.syscw - a.syscw,
  };
}
function allTicks() { const s = cpuSnap(); return sum(s.per) + sum(s.aux); }
async function waitServersIdle(maxMs) {
  // idle: at most 3 ticks (30 ms) of CPU in all over 300 ms, twice in a row
  const t0 = now();
  let prev = allTicks(), calm = 0;
  while (now() - t0 < maxMs) {
    await sleep(300);
    const cur = allTicks();
    calm = cur - prev <= 3 ? calm + 1 : 0;
    prev = cur;
    if (calm >= 2) return true;
  }
  return false;
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

// -- a raw Engine.IO v4 / Socket.IO v5 client over WebSocket, with acks ---------
class Client {
  constructor(index, url) {
    this.index = index;
    this.server = index % U;
    this.name = 'c' + String(index).padStart(4, '0');
    this.h = Object.create(null);
    this.acks = new Map();
    this.nextAck = 0;
    this.connected = false;
    this.closed = false;
    const wsUrl = url.replace(/^http/, 'ws').replace(/\/$/, '') + '/socket.io/?EIO=4&transport=websocket';
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
  _fire(ev, ...args) { const f = this.h[ev]; if (f) f(...args); }
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
  emit(ev, arg, ack) {
    if (this.ws.readyState !== 1) { noteError(`${this.name}: emit ${ev} on a closed socket`); return; }
    let id = '';
    if (ack) { id = String(this.nextAck++); this.acks.set(+id, ack); }
    this.ws.send('42' + id + JSON.stringify(arg === undefined ? [ev] : [ev, arg]));
  }
  disconnect() {
    if (this.closed) return;
    this.closed = true;
    if (this.ws.readyState === 1) { this.ws.send('41'); this.ws.close(); } else this.ws.terminate();
  }
}

// -- the chats of one phase ---------------------------------------------------
// A chat's key: sender * k + seq. Its message: `<tag>|<sender>|<seq>|<send ms>|pad`.
class Phase {
  constructor(tag, k) {
    this.tag = tag;
    this.k = k;
    this.expected = M * k * N;
    const chats = M * k;
    this.sendT = new Float64Array(chats).fill(NaN);
    this.ackT = new Float64Array(chats).fill(NaN);
    this.commitWall = new Float64Array(chats).fill(NaN);
    this.early = new Map(); // key -> [receipt time, same process] of deliveries seen before the ack
    this.sendSame = new Float64Array(this.expected); this.nSendSame = 0;
    this.sendCross = new Float64Array(this.expected); this.nSendCross = 0;
    this.commitSame = new Float64Array(this.expected); this.nCommitSame = 0;
    this.commitCross = new Float64Array(this.expected); this.nCommitCross = 0;
    this.ackSame = new Float64Array(this.expected); this.nAckSame = 0;
    this.ackCross = new Float64Array(this.expected); this.nAckCross = 0;
    this.delivered = 0;
    this.tLast = 0;
    this.dups = 0;
    this.fifo = 0;
    this.posOrder = 0;
    this.acked = 0;
    this.ackErrors = 0;
    // per client: chats seen (bitmap), last seq per sender, last position, order hash
    this.seen = Array.from({ length: N }, () => new Uint8Array(chats));
    this.lastSeq = Array.from({ length: N }, () => new Int32Array(M).fill(-1));
    this.lastPos = new Float64Array(N).fill(-1);
    this.orderHash = new Int32Array(N);
    this.received = new Int32Array(N);
    this.sent = new Int32Array(M);
  }
  send(clients, j, onAck) {
    const seq = this.sent[j]++;
    const key = j * this.k + seq;
    const t = now();
    this.sendT[key] = t;
    const msg = `${this.tag}|${j}|${seq}|${t.toFixed(3)}|${PAD}`;
    if (!ACKS) { clients[j].emit('chat', msg); return; }
    clients[j].emit('chat', msg, (res) => {
      const ta = now();
      lastEvent = ta;
      if (!res || res.ok !== true) { this.ackErrors++; noteError(`chat ack ${JSON.stringify(res)}`); return; }
      this.acked++;
      this.ackT[key] = ta;
      if (Number.isNaN(this.commitWall[key]) && res.time) this.commitWall[key] = isoMs(res.time);
      const early = this.early.get(key);
      if (early) {
        for (const [tr, same] of early) {
          if (same) this.ackSame[this.nAckSame++] = tr - ta; else this.ackCross[this.nAckCross++] = tr - ta;
        }
        this.early.delete(key);
      }
      if (onAck) onAck(j);
    });
  }
  deliver(c, sender, seq, payload, t) {
    const key = sender * this.k + seq;
    const seen = this.seen[c.index];
    if (seen[key]) { this.dups++; return; }
    seen[key] = 1;
    this.delivered++;
    this.received[c.index]++;
    this.tLast = t;
    const last = this.lastSeq[c.index];
    if (seq <= last[sender]) this.fifo++;
    last[sender] = seq;
    this.orderHash[c.index] = (Math.imul(this.orderHash[c.index], 1000003) + key + 1) | 0;
    const same = clientsServer(sender) === c.server;
    const lat = t - this.sendT[key];
    if (same) this.sendSame[this.nSendSame++] = lat; else this.sendCross[this.nSendCross++] = lat;
    if (!ACKS) return;
    if (typeof payload.position === 'number') {
      if (payload.position <= this.lastPos[c.index]) this.posOrder++;
      this.lastPos[c.index] = payload.position;
    }
    let cw = this.commitWall[key];
    if (Number.isNaN(cw) && typeof payload.time === 'string') cw = this.commitWall[key] = isoMs(payload.time);
    if (!Number.isNaN(cw)) {
      const d = wallMs(t) - cw;
      if (same) this.commitSame[this.nCommitSame++] = d; else this.commitCross[this.nCommitCross++] = d;
    }
    const ta = this.ackT[key];
    if (!Number.isNaN(ta)) {
      if (same) this.ackSame[this.nAckSame++] = t - ta; else this.ackCross[this.nAckCross++] = t - ta;
    } else {
      if (!this.early.has(key)) this.early.set(key, []);
      this.early.get(key).push([t, same]);
    }
  }
  result(cpu, t0) {
    const activeS = (this.tLast - t0) / 1000;
    const orders = new Set();
    let missing = 0;
    for (let i = 0; i < N; i++) {
      orders.add(this.orderHash[i]);
      missing += M * this.k - this.received[i];
    }
    return {
      complete: this.delivered === this.expected,
      delivered: this.delivered,
      expected: this.expected,
      active_s: +activeS.toFixed(3),
      deliveries_per_s: +(this.delivered / activeS).toFixed(1),
      latency_ms: {
        send_same: stats(this.sendSame, this.nSendSame),
        send_cross: stats(this.sendCross, this.nSendCross),
        commit_same: stats(this.commitSame, this.nCommitSame),
        commit_cross: stats(this.commitCross, this.nCommitCross),
        ack_same: stats(this.ackSame, this.nAckSame),
        ack_cross: stats(this.ackCross, this.nAckCross),
      },
      cpu,
      checks: {
        missing,
        duplicates: this.dups,
        fifo_violations: this.fifo,
        position_order_violations: ACKS ? this.posOrder : null,
        distinct_orders: orders.size,
        acked: ACKS ? this.acked : null,
        ack_errors: this.ackErrors,
        chats_delivered_never_acked: this.early.size,
      },
    };
  }
}
const PAD = 'x'.repeat(Math.max(0, SIZE - 24));
function clientsServer(index) { return index % U; }
function isoMs(s) {
  // '2026-12-02T10:37:43.123456Z' -> ms since the epoch, keeping the microseconds
  const dot = s.indexOf('.');
  if (dot < 0) return Date.parse(s);
  return Date.parse(s.slice(0, dot) + 'Z') + parseFloat('0' + s.slice(dot, s.length - 1)) * 1000;
}

// -- the run -------------------------------------------------------------------
async function main() {
  const clients = new Array(N);
  let phase = null;
  let warmDelivered = 0;
  let onEcho = null;
  const welcomeAt = [];

  // connect and log in, LOGIN_CONC at a time (setup, not measured)
  await new Promise((resolve) => {
    let started = 0, finished = 0;
    const timer = setTimeout(() => { noteError(`login timeout: ${N - finished} of ${N} unanswered`); resolve(); }, PHASE_TIMEOUT);
    const finish = () => {
      finished++;
      if (finished === N) { clearTimeout(timer); resolve(); } else startNext();
    };
    const startNext = () => {
      if (started >= N) return;
      const i = started++;
      const c = new Client(i, URLS[i % U]);
      clients[i] = c;
      c.on('connect', () => c.emit('login', c.name));
      c.on('welcome', () => { lastEvent = now(); welcomeAt.push(lastEvent); finish(); });
      c.on('loginNameBad', (x) => { noteError('loginNameBad ' + x); finish(); });
      c.on('loginNameExists', (x) => { noteError('loginNameExists ' + x); finish(); });
      c.on('protocolError', (x) => noteError(`${c.name} protocolError ${JSON.stringify(x)}`));
      c.on('error', (e) => { noteError(`${c.name}: ${e}`); if (!c.connected) finish(); });
      c.on('chat', (m) => {
        const t = now();
        lastEvent = t;
        const msg = m && m.message;
        if (typeof msg !== 'string') { noteError('bad chat payload'); return; }
        const p = msg.split('|', 3);
        const sender = +p[1];
        if (p[0] === 'w') {
          warmDelivered++;
        } else if (phase && p[0] === phase.tag) {
          phase.deliver(c, sender, +p[2], m, t);
        } else {
          noteError(`chat of another phase: ${msg.slice(0, 20)}`);
        }
        if (sender === i && onEcho) onEcho(sender);
      });
    };
    for (let k = 0; k < Math.min(LOGIN_CONC, N); k++) startNext();
  });
  if (errors.length) return { error: 'setup failed', errors };
  await waitQuiet(300, 30000);

  // warm-up: closed loop, window 1, not measured
  const wsent = new Int32Array(M);
  const sendWarm = (j) => {
    if (wsent[j] >= WARM) return;
    wsent[j]++;
    clients[j].emit('chat', `w|${j}|${wsent[j]}|0|${PAD}`);
  };
  onEcho = sendWarm;
  for (let j = 0; j < M; j++) sendWarm(j);
  await waitFor(() => warmDelivered >= M * WARM * N, PHASE_TIMEOUT);
  onEcho = null;
  if (warmDelivered < M * WARM * N) noteError(`warm-up: ${warmDelivered} of ${M * WARM * N} delivered`);
  await waitQuiet(200, 10000);

  const out = {};
  // fixed rate: latency
  await waitServersIdle(20000);
  {
    const ph = phase = new Phase('f', FIXED_K);
    const c0 = cpuSnap();
    const t0 = c0.t;
    const period = 1000 / RATE;
    const next = new Float64Array(M);
    for (let j = 0; j < M; j++) next[j] = t0 + (j / M) * period;
    let lateMax = 0;
    const tick = () => {
      const t = now();
      let soonest = Infinity, left = false;
      for (let j = 0; j < M; j++) {
        while (ph.sent[j] < FIXED_K && next[j] <= t) {
          lateMax = Math.max(lateMax, t - next[j]);
          ph.send(clients, j, null);
          next[j] += period;
        }
        if (ph.sent[j] < FIXED_K) { left = true; soonest = Math.min(soonest, next[j]); }
      }
      if (left) setTimeout(tick, Math.max(0, soonest - now()));
    };
    tick();
    await waitFor(() => ph.delivered >= ph.expected, (FIXED_K / RATE) * 1000 + PHASE_TIMEOUT);
    if (ACKS) await waitFor(() => ph.acked + ph.ackErrors >= M * FIXED_K, 5000);
    const c1 = cpuSnap();
    out.fixed = { params: { rate_per_sender: RATE, k: FIXED_K }, max_send_lateness_ms: +lateMax.toFixed(2),
      ...ph.result(cpuDiff(c0, { ...c1, t: ph.tLast || c1.t }), t0) };
  }
  await waitQuiet(200, 10000);

  // closed loop: throughput and CPU per delivery
  await waitServersIdle(20000);
  {
    const ph = phase = new Phase('c', CLOSED_K);
    onEcho = (j) => { if (ph.sent[j] < CLOSED_K) ph.send(clients, j, null); };
    markWindow('SIGUSR1');
    const c0 = cpuSnap();
    const t0 = c0.t;
    for (let j = 0; j < M; j++) for (let w = 0; w < WINDOW && ph.sent[j] < CLOSED_K; w++) ph.send(clients, j, null);
    await waitFor(() => ph.delivered >= ph.expected, PHASE_TIMEOUT);
    const c1 = cpuSnap();
    markWindow('SIGUSR2');
    onEcho = null;
    if (ACKS) await waitFor(() => ph.acked + ph.ackErrors >= M * CLOSED_K, 5000);
    out.closed = { params: { k: CLOSED_K, window: WINDOW }, ...ph.result(cpuDiff(c0, { ...c1, t: ph.tLast || c1.t }), t0) };
  }
  phase = null;
  for (const c of clients) if (c) c.disconnect();
  await waitQuiet(300, 10000);
  return out;
}

const hard = setTimeout(() => {
  process.stdout.write(JSON.stringify({ label: LABEL, error: `hard timeout ${MAX_S} s`, errors: errors.slice(0, 5) }) + '\n');
  process.exit(3);
}, MAX_S * 1000);
main().then((r) => {
  clearTimeout(hard);
  const rec = {
    ts: new Date().toISOString(), label: LABEL, urls: URLS,
    params: { n: N, m: M, warm: WARM, size: SIZE, acks: ACKS, processes: U },
    ...r,
  };
  if (errors.length) { rec.errors = errors.length; rec.first_errors = errors.slice(0, 5); }
  process.stdout.write(JSON.stringify(rec) + '\n');
  process.exit(0);
}, (e) => {
  process.stdout.write(JSON.stringify({ label: LABEL, error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
