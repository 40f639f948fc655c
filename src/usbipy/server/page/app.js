// usbipy live status page: no framework, no build step, CSP "default-src 'self'".
//
// Every string from the server (busid, CN, names, addresses, rule text) is
// untrusted: it reaches the DOM only as textContent, through setAttribute, or as
// a text node made by el() below. Nothing here parses a string as markup.
'use strict';

(() => {
  const STATUS_URL = '/api/v1/status';
  const EVENTS_URL = '/api/v1/events';
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);

  // Date.now() when the last status arrived: the "seconds" of each session keep
  // counting up between messages, since the server only sends on a change.
  let receivedAt = Date.now();
  let polling = false;

  // el('td', {class: 'x'}, 'text', node, null, ...): attributes are set with
  // setAttribute, strings become text nodes; null/undefined/'' children are skipped.
  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v != null && v !== false) node.setAttribute(k, String(v));
    }
    for (const kid of kids) {
      if (kid != null && kid !== '') node.append(typeof kid === 'string' ? document.createTextNode(kid) : kid);
    }
    return node;
  }

  const pad = (n) => String(n).padStart(2, '0');
  const clock = (d) => `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;

  // Decimal units (kB = 1000 B), one decimal below 10: "1.2 MB", "34 kB", "512 B".
  function bytes(n) {
    if (n == null) return '—';
    const units = ['B', 'kB', 'MB', 'GB', 'TB', 'PB'];
    let v = Number(n), i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return `${i === 0 ? Math.round(v) : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
  }

  // "42 s", "5 min", "2 h 5 min", "3 d 4 h"
  function duration(s) {
    s = Math.max(0, Math.floor(Number(s) || 0));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 24) return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
    const d = Math.floor(h / 24);
    return h % 24 ? `${d} d ${h % 24} h` : `${d} d`;
  }

  // The session's start in local time: "10:00", or with the date when not today.
  function localTime(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return d.toDateString() === new Date().toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
  }

  // IPv6 literals need brackets before ":port".
  function hostPort(host, port) {
    const h = /:/.test(host) && !/^\[/.test(host) ? `[${host}]` : String(host);
    return port == null ? h : `${h}:${port}`;
  }

  function stateText(d) {
    const c = d.client;
    if (d.state !== 'in-use' && d.state !== 'served-by-kernel') return String(d.state);
    let t = 'in use';
    if (c) t += ` by ${c.address}` + (c.cn != null ? ` (CN=${c.cn})` : '');
    if (d.state === 'served-by-kernel') t += ' — served by the kernel';
    return t;
  }

  function showMessage(text, kind) {
    $('message').textContent = text;
    $('message-bar').dataset.kind = kind;
    $('message-bar').hidden = false;
  }

  function setLive(state) {
    const live = $('live');
    live.dataset.live = state;
    live.textContent = state === 'live' ? 'live' : state === 'reconnecting' ? 'reconnecting…' : 'connecting…';
  }

  // ---- rendering: each status message re-renders everything from scratch ----

  function render(s) {
    receivedAt = Date.now();
    renderHeader(s.server || {}, s.you || null);
    renderDevices(Array.isArray(s.devices) ? s.devices : []);
    renderServers(Array.isArray(s.servers) ? s.servers : []);
    $('updated').textContent = `updated ${clock(new Date())}`;
  }

  function renderHeader(server, you) {
    const name = server.name ? String(server.name) : 'usbipy';
    document.title = `usbipy — ${name}`;
    $('server-name').textContent = name;
    $('server-version').textContent = server.version ? `usbipy ${server.version}` : '';
    $('server-tls').hidden = !server.tls;
    const addrs = Array.isArray(server.addresses) ? server.addresses : [];
    $('server-addresses').textContent = addrs.map((a) => hostPort(a, server.port)).join(', ');
    $('you').textContent = you ? `you: ${you.client} (${you.grant})` : '';
  }

  const cell = (label, cls, ...kids) => el('td', { class: cls, 'data-label': label }, ...kids);

  function deviceRow(d) {
    const c = d.client || null;
    const names = [d.vendor, d.product].filter((x) => x).join(' ');
    const tr = el('tr', { 'data-busid': d.busid, 'data-state': d.state });

    // The TLS marker of a protected session is drawn by CSS (td.state[data-protected]::after),
    // so the cell's text stays exactly the state sentence.
    const state = el('td', {
      class: 'state', 'data-label': 'State',
      'data-protected': c && c.protected ? 'true' : null,
      title: c && c.protected ? 'session encrypted by TLS' : null,
    }, stateText(d));

    const since = !c ? '—' : el('span', null, localTime(c.since), ' · ',
      el('span', { class: 'duration', 'data-seconds': Number(c.seconds) || 0 }, duration(c.seconds)));

    // bytes_in: from the client to the device; bytes_out: from the device to the client.
    // Both are null when the kernel serves the device (usbipy does not see the traffic).
    const traffic = !c || (c.bytes_in == null && c.bytes_out == null) ? '—'
      : el('span', { title: 'in: from the client · out: to the client' },
        el('span', { class: 'dir' }, `in ${bytes(c.bytes_in)}`), ' · ',
        el('span', { class: 'dir' }, `out ${bytes(c.bytes_out)}`));

    tr.append(
      cell('Bus ID', 'busid', el('code', null, String(d.busid))),
      // One wrapper, so the phone layout's two-column grid sees a single value.
      cell('Device', 'device', el('div', null,
        el('code', { class: 'vidpid' }, String(d.vid_pid)),
        names && el('span', { class: 'names' }, names),
        d.serial && el('span', { class: 'serial' }, `serial ${d.serial}`),
        el('span', { class: 'meta' }, [d.via, d.speed].filter((x) => x).join(' · ')))),
      state,
      cell('Since', 'since', since),
      cell('Traffic', 'traffic', traffic),
      cell('Rule', 'rule', d.rule ? String(d.rule) : '—'),
      cell('', 'action', releaseButton(d)));
    return tr;
  }

  function renderDevices(devices) {
    // Keep keyboard focus on a Release button across a re-render (rows are matched
    // by dataset value, not by a selector built from an untrusted busid).
    const active = document.activeElement;
    const keep = active && active.matches('button.release') ? active.closest('tr').dataset.busid : null;
    const rows = devices.map(deviceRow);
    if (!rows.length) rows.push(el('tr', { class: 'empty' }, el('td', { colspan: 7 }, 'No devices exported.')));
    $('device-rows').replaceChildren(...rows);
    const button = keep !== null && rows.find((r) => r.dataset.busid === keep)?.querySelector('button.release');
    if (button) button.focus();
  }

  function renderServers(servers) {
    const items = servers.map((s) => {
      const name = String(s.name || s.host);
      let label = el('span', { class: 'name' }, name);
      const page = typeof s.page === 'string' ? s.page : '';
      // Only http(s) links: a "javascript:" page from a peer must not become a link.
      if (/^https?:\/\//i.test(page)) {
        label = el('a', { class: 'name', rel: 'noopener noreferrer' }, name);
        label.setAttribute('href', page);
      }
      return el('li', null, label, ' ', el('span', { class: 'hostport' }, hostPort(s.host, s.port)),
        s.tls ? el('span', { class: 'badge tls' }, 'TLS') : null);
    });
    if (!items.length) items.push(el('li', { class: 'none' }, 'None found'));
    $('servers').replaceChildren(...items);
  }

  // ---- release ----
  function releaseButton(d) {
    if (!d.can_release || (d.state !== 'in-use' && d.state !== 'served-by-kernel')) return null;
    const button = el('button', { type: 'button', class: 'release' }, 'Release');
    button.addEventListener('click', () => release(d, button));
    return button;
  }

  async function release(d, button) {
    const who = d.client ? String(d.client.address) : 'its client';
    if (!window.confirm(`Release ${d.busid} from ${who}? The client loses the device.`)) return;
    button.disabled = true;
    try {
      const r = await fetch(`/api/v1/devices/${encodeURIComponent(d.busid)}/release`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}', cache: 'no-store',
      });
      const body = await r.json().catch(() => ({}));  // an error page that is not JSON
      if (r.ok) showMessage(`Released ${body.released || d.busid} from ${body.client || who}.`, 'info');
      else showMessage(`Could not release ${d.busid}: ${body.error || `HTTP ${r.status}`}`, 'error');
    } catch (e) {
      showMessage(`Could not release ${d.busid}: ${e.message}`, 'error');
    }
    button.disabled = false;
    await refresh(false);
  }

  // ---- getting status: Server-Sent Events, or polling without EventSource ----

  async function refresh(quiet) {
    try {
      const r = await fetch(STATUS_URL, { cache: 'no-store', headers: { Accept: 'application/json' } });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      render(await r.json());
      return true;
    } catch (e) {
      if (!quiet) showMessage(`Could not load the status: ${e.message}`, 'error');
      return false;
    }
  }

  function startPolling() {
    if (polling) return;
    polling = true;
    const tick = async () => {
      setLive((await refresh(true)) ? 'live' : 'reconnecting');
      setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function connect() {
    if (typeof window.EventSource !== 'function') { startPolling(); return; }
    const es = new EventSource(EVENTS_URL);
    es.addEventListener('status', (ev) => {
      let status;
      try { status = JSON.parse(ev.data); } catch (e) { showMessage('The server sent a bad status.', 'error'); return; }
      setLive('live');
      render(status);
    });
    es.addEventListener('error', () => {
      // EventSource retries by itself, except once it is CLOSED (say the server
      // answered with an error status or another content type): then poll.
      if (es.readyState === EventSource.CLOSED) { es.close(); startPolling(); }
      setLive('reconnecting');
    });
  }

  // Age the "5 min" durations between messages without re-rendering the table.
  setInterval(() => {
    const age = (Date.now() - receivedAt) / 1000;
    for (const span of document.querySelectorAll('#device-rows .duration')) {
      span.textContent = duration(Number(span.dataset.seconds) + age);
    }
  }, 5000);

  $('message-close').addEventListener('click', () => { $('message-bar').hidden = true; });
  connect();
})();
