'use strict';
// Idle-memory scenario for bench/compare.py (copied next to the shared load
// generator so it can use its `ws`-based RawClient).
//
// Warm the server up with a few logins, wait until it is idle, read its
// resident memory (VmRSS from /proc/<pid>/status), then connect and log in N
// clients (at most --conc in flight), wait until every client has its welcome
// and the server is idle again, read VmRSS again, and print one JSON line with
// the growth per client. Loopback only; every wait is bounded.
const fs = require('fs');
const { performance } = require('perf_hooks');
const { RawClient } = require('./rawclient');

function parseArgs(argv) {
  const a = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error('bad args');
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
const CONC = parseInt(A.conc || '50', 10);
const WARM = parseInt(A.warm || '20', 10);
const PID = parseInt(A['server-pid'] || '0', 10);
const MAX_S = parseFloat(A['max-s'] || '120');
const now = () => performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function rssKb() {
  const s = fs.readFileSync(`/proc/${PID}/status`, 'utf8');
  const m = /VmRSS:\s+(\d+) kB/.exec(s);
  return m ? parseInt(m[1], 10) : NaN;
}
function cpuTicks() {
  const s = fs.readFileSync(`/proc/${PID}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return parseInt(f[11], 10) + parseInt(f[12], 10);
}
async function waitIdle(maxMs) {
  // idle: at most 2 ticks (20 ms) of CPU over 300 ms, twice in a row
  const t0 = now();
  let prev = cpuTicks(), calm = 0;
  while (now() - t0 < maxMs) {
    await sleep(300);
    const cur = cpuTicks();
    calm = cur - prev <= 2 ? calm + 1 : 0;
    prev = cur;
    if (calm >= 2) return true;
  }
  return false;
}

function loginMany(n, prefix, conc, timeoutMs) {
  return new Promise((resolve) => {
    const clients = [];
    let started = 0, done = 0, failed = 0, finished = false;
    const timer = setTimeout(() => { finished = true; resolve({ clients, done, failed, timedOut: true }); }, timeoutMs);
    const finish = (ok) => {
      if (ok) done++; else failed++;
      if (finished) return;
      if (done + failed === n) { finished = true; clearTimeout(timer); resolve({ clients, done, failed }); }
      else next();
    };
    const next = () => {
      if (started >= n) return;
      const name = prefix + String(started++).padStart(5, '0');
      const c = new RawClient(URL);
      clients.push(c);
      c.on('connect', () => c.emit('login', name));
      c.on('welcome', () => finish(true));
      c.on('loginNameBad', () => finish(false));
      c.on('loginNameExists', () => finish(false));
      c.on('connect_error', () => finish(false));
    };
    for (let i = 0; i < Math.min(conc, n); i++) next();
  });
}

async function main() {
  const hard = setTimeout(() => {
    process.stdout.write(JSON.stringify({ scenario: 'idle', error: `hard timeout ${MAX_S}s` }) + '\n');
    process.exit(3);
  }, MAX_S * 1000);
  if (!PID) throw new Error('--server-pid is required');
  const warm = await loginMany(WARM, 'w', WARM, 30000);
  for (const c of warm.clients) c.disconnect();
  await waitIdle(20000);
  await sleep(500);
  const rss0 = rssKb();
  const t0 = now();
  const res = await loginMany(N, 'i', CONC, MAX_S * 600);
  const loginS = (now() - t0) / 1000;
  const idle = await waitIdle(30000);
  await sleep(1000);
  const rss1 = rssKb();
  const out = {
    scenario: 'idle',
    params: { N, conc: CONC, warm: WARM },
    logged_in: res.done,
    failed: res.failed,
    timed_out: !!res.timedOut,
    login_s: +loginS.toFixed(2),
    server_idle: idle,
    rss_before_kb: rss0,
    rss_after_kb: rss1,
    rss_kb_per_client: +((rss1 - rss0) / N).toFixed(2),
  };
  for (const c of res.clients) c.disconnect();
  await sleep(300);
  clearTimeout(hard);
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}
main().catch((e) => { console.error(e); process.exit(1); });
