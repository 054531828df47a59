// palisade ui: the service map, the flow table, the pod panel and a drop's explanation.
// Plain DOM and SVG, no framework; every datum comes from this page's own /api/ routes
// (served by `palisade ui` from the agents' local API). Text goes in with textContent only.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const POLL_MS = 2000;
const VERDICTS = ['FORWARDED', 'DROPPED', 'AUDIT'];

const state = {
  filter: '',
  flows: [],
  endpoints: [],
  edge: null, // "src|dst|verdict"
  flowKey: null, // time|node|direction of the selected flow
  connVerdict: new Map(), // connKey -> the connection's verdict
  byIp: new Map(), // a pod's address -> "ns/name", from every agent's endpoints
  pod: null, // "ns/name"
  timer: null,
};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// The map's node of one end of a flow: the pod, else what the labels say (an entity or a
// CIDR), else the address.
// A pod of another node is named by its address in the records of this node's agent:
// the page asks every agent for its pods and names it from their lists.
function endKey(ep, ip) {
  if (ep.pod_name) return `${ep.namespace}/${ep.pod_name}`;
  if (ip && state.byIp.has(ip)) return state.byIp.get(ip);
  const label = (ep.labels || []).find((l) => l.startsWith('reserved:') || l.startsWith('cidr:'));
  return label || ip;
}

function endNamespace(ep, ip) {
  if (ep.pod_name) return ep.namespace;
  const pod = ip && state.byIp.get(ip);
  return pod ? pod.split('/')[0] : null;
}

function flowKey(f) {
  return `${f.time}|${f.node_name}|${f.traffic_direction}`;
}

// One connection (5-tuple): its records at the source's egress and at the destination's
// ingress, and retransmissions, are one edge crossing. Its verdict on the map is the
// worst of its records (forwarded at the egress, then dropped at the ingress: dropped).
function connKey(f) {
  const x = f.l4 || {};
  const p = x.TCP || x.UDP || x.SCTP;
  const i = x.ICMPv4 || x.ICMPv6;
  return [f.IP.source, f.IP.destination, l4(f).proto, p ? p.source_port : '', p ? p.destination_port : (i ? i.type : '')].join('|');
}

const RANK = { FORWARDED: 1, AUDIT: 2, DROPPED: 3 };

function classify(flows) {
  const v = new Map();
  for (const f of flows) {
    if (f.is_reply) continue;
    const k = connKey(f);
    const cur = v.get(k);
    if (!cur || (RANK[f.verdict] || 0) > (RANK[cur] || 0)) v.set(k, f.verdict);
  }
  state.connVerdict = v;
}

function edgeKey(f) {
  const verdict = (!f.is_reply && state.connVerdict.get(connKey(f))) || f.verdict;
  return `${endKey(f.source, f.IP.source)}|${endKey(f.destination, f.IP.destination)}|${verdict}${f.is_reply ? '|reply' : ''}`;
}

function l4(f) {
  const x = f.l4 || {};
  for (const p of ['TCP', 'UDP', 'SCTP']) {
    if (x[p]) return { proto: p, port: x[p].destination_port, text: `${p} ${x[p].source_port} → ${x[p].destination_port}` };
  }
  for (const p of ['ICMPv4', 'ICMPv6']) {
    if (x[p]) return { proto: p === 'ICMPv4' ? 'ICMP' : 'ICMPv6', port: x[p].type, text: `${p} type ${x[p].type} code ${x[p].code}` };
  }
  return { proto: String(x.protocol ?? 'ANY'), port: null, text: `protocol ${x.protocol ?? '?'}` };
}

function decidedBy(f) {
  const all = [].concat(f.ingress_allowed_by || [], f.egress_allowed_by || [], f.ingress_denied_by || [], f.egress_denied_by || []);
  return all.map((p) => {
    const name = p.namespace ? `${p.kind} ${p.namespace}/${p.name}` : `${p.kind} ${p.name}`;
    if (p.action === 'default-deny') return `${name} (default deny)`;
    return p.rule ? `${name} ${p.rule}` : name;
  });
}

async function getJSON(url, init) {
  const r = await fetch(url, init);
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status}`);
  return body;
}

function showError(msg) {
  const e = document.getElementById('error');
  e.hidden = !msg;
  e.textContent = msg || '';
}

async function poll() {
  clearTimeout(state.timer);
  try {
    const [flows, eps] = await Promise.all([
      getJSON(`/api/flows?q=${encodeURIComponent(state.filter)}`),
      getJSON('/api/endpoints'),
    ]);
    state.flows = flows.flows;
    classify(state.flows);
    state.endpoints = eps.endpoints;
    state.byIp = new Map();
    for (const e of state.endpoints) {
      for (const ip of [e.ipv4, e.ipv6]) if (ip) state.byIp.set(ip, `${e.namespace}/${e.name}`);
    }
    const notes = [].concat(flows.errors, eps.errors, flows.lost.map((l) => `EVENTS LOST: ${l.num_events_lost} flow(s) (${l.source})`));
    showError(notes.join('\n'));
    document.getElementById('status').textContent =
      `${state.flows.length} flow(s), ${state.endpoints.length} pod(s); updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = 'true';
    render();
  } catch (e) {
    showError(String(e.message || e));
    document.getElementById('status').textContent = 'not updated';
  }
  state.timer = setTimeout(poll, POLL_MS);
}

function render() {
  renderMap();
  renderTable();
  if (state.edge && !state.flowKey && !state.pod) renderEdgePanel();
}

// Layout: one column per namespace (pods stacked in it), then one for the peers that are
// not pods (world, CIDRs, hosts).
function renderMap() {
  const map = document.getElementById('map');
  const nodes = new Map(); // key -> {key, ns, label}
  for (const e of state.endpoints) {
    const key = `${e.namespace}/${e.name}`;
    nodes.set(key, { key, ns: e.namespace, label: e.name });
  }
  const edges = new Map();
  for (const f of state.flows) {
    for (const [ep, ip] of [[f.source, f.IP.source], [f.destination, f.IP.destination]]) {
      const key = endKey(ep, ip);
      const ns = endNamespace(ep, ip);
      if (!nodes.has(key)) nodes.set(key, { key, ns, label: ns ? key.slice(ns.length + 1) : key });
    }
    if (f.is_reply) continue;
    const k = edgeKey(f);
    const [src, dst, verdict] = k.split('|');
    if (src === dst) continue;
    const e = edges.get(k) || { key: k, src, dst, verdict, conns: new Set(), records: 0 };
    e.conns.add(connKey(f));
    e.records += 1;
    edges.set(k, e);
  }
  const columns = new Map();
  for (const n of [...nodes.values()].sort((a, b) => a.key.localeCompare(b.key))) {
    const c = n.ns ?? '\u{10FFFF}outside';
    if (!columns.has(c)) columns.set(c, []);
    columns.get(c).push(n);
  }
  const names = [...columns.keys()].sort();
  // Redraw only when something drawn changed (a poll that brings nothing new leaves the
  // map, and what the pointer is on, alone).
  const signature = JSON.stringify([names, [...nodes.keys()].sort(), [...edges.values()].map((e) => [e.key, e.conns.size, e.records]).sort(), state.edge, state.pod]);
  if (map.dataset.signature === signature) return;
  map.dataset.signature = signature;
  // Each namespace a box with its pods on a circle (no edge runs across a third pod); the
  // peers that are not pods in a column of their own.
  const boxes = names.map((c) => {
    const n = columns.get(c).length;
    const outside = c.startsWith('\u{10FFFF}');
    const r = outside || n < 2 ? 0 : Math.max(100, (n * 110) / (2 * Math.PI));
    const w = outside ? 220 : Math.max(220, 2 * r + 160);
    const h = outside ? 60 + n * 80 : Math.max(160, 2 * r + 120);
    return { c, n, outside, r, w, h };
  });
  const gap = 20, top = 10;
  const width = boxes.reduce((a, b) => a + b.w + gap, gap);
  const height = Math.max(300, ...boxes.map((b) => b.h + 2 * top));
  map.setAttribute('viewBox', `0 0 ${width} ${height}`);
  map.setAttribute('height', String(Math.min(height, 700)));
  map.replaceChildren();
  const defs = svg('defs');
  for (const v of VERDICTS) {
    defs.append(svg('marker', { id: `arrow-${v}`, class: v, viewBox: '0 0 10 10', refX: '10', refY: '5', markerUnits: 'userSpaceOnUse', markerWidth: '12', markerHeight: '12', orient: 'auto-start-reverse' },
      svg('path', { d: 'M 0 0 L 10 5 L 0 10 z' })));
  }
  map.append(defs);
  const pos = new Map();
  const nodeEls = []; // drawn over the edges
  let x0 = gap;
  for (const b of boxes) {
    const list = columns.get(b.c);
    map.append(svg('rect', { class: 'ns-box', x: x0, y: top, width: b.w, height: b.h, rx: 8 }));
    map.append(svg('text', { class: 'ns-label', x: x0 + 10, y: top + 20 }, b.outside ? 'not pods (entities, CIDRs, hosts)' : `namespace ${b.c}`));
    const cx = x0 + b.w / 2, cy = top + 20 + (b.h - 20) / 2;
    list.forEach((n, j) => {
      let x = cx, y = cy;
      if (b.outside) {
        y = top + 60 + j * 80;
      } else if (b.n > 1) {
        const a = -Math.PI / 2 + (2 * Math.PI * j) / b.n;
        x = cx + b.r * Math.cos(a);
        y = cy + b.r * Math.sin(a);
      }
      pos.set(n.key, { x, y });
      const g = svg('g', { class: `node${b.outside ? ' outside' : ''}${state.pod === n.key ? ' selected' : ''}`, 'data-key': n.key, tabindex: '0' },
        svg('circle', { cx: x, cy: y, r: 18 }),
        svg('text', { x, y: y < cy - 1 ? y - 26 : y + 34, 'text-anchor': 'middle' }, n.label));
      if (!b.outside) g.addEventListener('click', () => selectPod(n.key));
      nodeEls.push(g);
    });
    x0 += b.w + gap;
  }
  const sides = { FORWARDED: 1, DROPPED: -1, AUDIT: 0.4 };
  for (const e of edges.values()) e.count = e.conns.size;
  for (const e of edges.values()) {
    const a = pos.get(e.src), b = pos.get(e.dst);
    if (!a || !b) continue;
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const ux = dx / len, uy = dy / len;
    const s = { x: a.x + ux * 20, y: a.y + uy * 20 }, t = { x: b.x - ux * 22, y: b.y - uy * 22 };
    const bend = 45 * (sides[e.verdict] ?? 0);
    const c = { x: (s.x + t.x) / 2 - uy * bend, y: (s.y + t.y) / 2 + ux * bend };
    const d = `M ${s.x} ${s.y} Q ${c.x} ${c.y} ${t.x} ${t.y}`;
    const mid = { x: (s.x + 2 * c.x + t.x) / 4, y: (s.y + 2 * c.y + t.y) / 4 };
    const g = svg('g', { class: `edge ${e.verdict}${state.edge === e.key ? ' selected' : ''}`, 'data-src': e.src, 'data-dst': e.dst, 'data-verdict': e.verdict, 'data-count': e.count, 'data-records': e.records, tabindex: '0' },
      svg('title', {}, `${e.src} → ${e.dst}: ${e.count} ${e.verdict.toLowerCase()} connection(s), ${e.records} flow record(s)`),
      svg('path', { class: 'hit', d }),
      svg('path', { class: 'line', d, 'marker-end': `url(#arrow-${e.verdict})` }),
      svg('text', { x: mid.x, y: mid.y, 'text-anchor': 'middle' }, `${e.count}`));
    g.addEventListener('click', () => selectEdge(e.key));
    map.append(g);
  }
  map.append(...nodeEls);
}

function visibleFlows() {
  return state.edge ? state.flows.filter((f) => edgeKey(f) === state.edge) : state.flows;
}

function renderTable() {
  const tbody = document.querySelector('#flows tbody');
  const scope = document.getElementById('flows-scope');
  const flows = visibleFlows().slice().reverse();
  scope.replaceChildren();
  if (state.edge) {
    const [s, d, v] = state.edge.split('|');
    scope.append(`${s} → ${d}, ${v.toLowerCase()} `, el('button', { class: 'link', id: 'clear-edge', type: 'button', onclick: () => { state.edge = null; state.flowKey = null; render(); } }, 'show all'));
  } else {
    scope.append('(newest first)');
  }
  tbody.replaceChildren(...flows.map((f) => {
    const x = l4(f);
    const name = (ep, ip) => {
      const key = endKey(ep, ip);
      return key === ip ? ip : (ep.pod_name || state.byIp.has(ip) ? key : `${ip} ${key}`);
    };
    const src = name(f.source, f.IP.source);
    const dst = name(f.destination, f.IP.destination);
    const why = f.drop_reason_desc || (f.forward_reason_desc !== 'POLICY' && f.forward_reason_desc);
    const reason = why ? ` ${why}` : '';
    const tr = el('tr', { class: flowKey(f) === state.flowKey ? 'selected' : '', 'data-verdict': f.verdict },
      el('td', { class: 'mono' }, f.time.replace(/^.*T/, '').slice(0, 12)),
      el('td', {}, f.node_name),
      el('td', {}, src),
      el('td', {}, dst),
      el('td', {}, f.traffic_direction + (f.is_reply ? ' (reply)' : '')),
      el('td', { class: 'mono' }, x.text),
      el('td', { class: `verdict ${f.verdict}` }, f.verdict + reason),
      el('td', {}, decidedBy(f).join(', ')));
    tr.addEventListener('click', () => selectFlow(f));
    return tr;
  }));
}

function panel(title, ...body) {
  document.getElementById('panel-title').textContent = title;
  document.getElementById('panel-body').replaceChildren(...body);
}

function dl(pairs) {
  const d = el('dl');
  for (const [k, v] of pairs) d.append(el('dt', {}, k), el('dd', {}, v));
  return d;
}

function list(items, cls) {
  return items.length ? el('ul', { class: cls || '' }, ...items.map((i) => el('li', {}, i))) : el('p', { class: 'hint' }, 'none');
}

function selectEdge(key) {
  state.edge = key;
  state.flowKey = null;
  state.pod = null;
  render();
  renderEdgePanel();
}

function renderEdgePanel() {
  const [s, d, v] = state.edge.split('|');
  const flows = visibleFlows();
  const ports = [...new Set(flows.map((f) => l4(f).text.replace(/ \d+ →/, ' →')))];
  const conns = new Set(flows.map(connKey)).size;
  panel(`${s} → ${d}`, dl([['verdict', v], ['connections', String(conns)], ['flow records', String(flows.length)], ['L4', ports.join(', ')]]),
    el('p', { class: 'hint' }, 'Pick a flow in the table below for its explanation.'));
}

async function selectPod(key) {
  state.pod = key;
  state.flowKey = null;
  renderMap();
  panel(key, el('p', { class: 'hint' }, 'loading…'));
  try {
    const p = await getJSON(`/api/pod?name=${encodeURIComponent(key)}`);
    if (state.pod !== key) return;
    const e = p.endpoint;
    const enforced = [e.ingressEnforced && 'ingress', e.egressEnforced && 'egress'].filter(Boolean).join(' + ') || 'not enforced';
    const rows = (p.bpf.entries || []).map((x) => el('tr', {},
      el('td', {}, x.direction), el('td', {}, x.identity === 0 ? 'any' : `${x.identity} ${x.labels.filter((l) => l.startsWith('k8s:app') || !l.startsWith('k8s:')).join(' ')}`),
      el('td', {}, `${x.protocol}/${x.port}`), el('td', { class: `decision ${x.action}` }, x.action),
      el('td', {}, (x.rules.length ? x.rules : x.policies).join('; '))));
    const entries = el('table', { id: 'pod-entries' },
      el('thead', {}, el('tr', {}, el('th', {}, 'dir'), el('th', {}, 'peer'), el('th', {}, 'L4'), el('th', {}, 'action'), el('th', {}, 'from'))),
      el('tbody', {}, ...rows));
    panel(`pod ${key}`,
      dl([['node', p.node], ['identity', String(e.identity)], ['address', e.ipv4 || ''], ['enforced', enforced], ['kernel entries', String(p.bpf.entries.length)]]),
      el('h3', {}, 'labels'), list(e.securityLabels || [], 'mono'),
      el('h3', {}, 'policies with entries for it'), list(p.policies, 'pod-policies'),
      el('h3', {}, 'effective ingress/egress entries'), entries);
  } catch (err) {
    panel(key, el('p', { class: 'error' }, String(err.message || err)));
  }
}

async function selectFlow(f) {
  state.flowKey = flowKey(f);
  state.pod = null;
  renderTable();
  const x = l4(f);
  const pod = (ep, ip) => (ep.pod_name || state.byIp.has(ip) ? endKey(ep, ip) : ip);
  const from = pod(f.source, f.IP.source);
  const to = pod(f.destination, f.IP.destination);
  const facts = dl([
    ['time', f.time], ['node', f.node_name], ['observed at', `${f.observed_at || '?'} (${f.traffic_direction})`],
    ['L4', x.text], ['verdict', f.verdict + (f.drop_reason_desc ? ` (${f.drop_reason_desc})` : '') + (f.forward_reason_desc ? ` (${f.forward_reason_desc})` : '')],
    ['decided by', decidedBy(f).join(', ') || '-'], ['summary', f.Summary],
  ]);
  const explainBox = el('div', { id: 'explain' }, el('p', { class: 'hint' }, 'asking policy explain…'));
  panel(`${f.verdict === 'DROPPED' ? 'drop' : 'flow'} ${from} → ${to}`, facts, el('h3', {}, 'policy explain'), explainBox);
  if (x.port === null) {
    explainBox.replaceChildren(el('p', { class: 'hint' }, 'no port or ICMP type: nothing to explain'));
    return;
  }
  try {
    const e = await getJSON('/api/explain', {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ from, to, port: x.port, protocol: x.proto }),
    });
    if (state.flowKey !== flowKey(f)) return;
    const side = (name, s) => el('div', { class: `side ${name}` },
      el('h3', {}, `${name} of ${s.endpoint || '(not a local pod)'}: `, el('span', { class: `decision ${s.decision}` }, s.decision)),
      s.entry ? el('p', { class: 'mono' }, `entry ${s.entry}`) : '',
      s.rules.length ? list(s.rules.map((r) => `rule ${r}`), 'rules') : '',
      (s.tiers || []).length ? list(s.tiers.map((t) => `tier ${t}`), 'tiers') : '',
      (s.defaultDenyBy || []).length
        ? el('div', {}, el('p', {}, `default deny: these policies select ${s.endpoint} for ${name} and no rule of theirs allows the flow:`),
          list(s.defaultDenyBy, 'default-deny-by'))
        : '');
    explainBox.replaceChildren(
      el('p', {}, `${e.from} (identity ${e.fromIdentity}) → ${e.to} (identity ${e.toIdentity}) ${e.port}/${e.protocol}: `,
        el('strong', { class: `decision ${e.verdict}` }, e.verdict.toUpperCase())),
      side('egress', e.egress), side('ingress', e.ingress));
  } catch (err) {
    explainBox.replaceChildren(el('p', { class: 'error' }, String(err.message || err)));
  }
}

document.addEventListener('DOMContentLoaded', () => {
  const input = document.getElementById('filter');
  const params = new URLSearchParams(location.search);
  if (params.has('q')) input.value = params.get('q');
  state.filter = input.value;
  document.getElementById('filter-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.filter = input.value;
    state.edge = null;
    state.flowKey = null;
    history.replaceState(null, '', state.filter ? `?q=${encodeURIComponent(state.filter)}` : location.pathname);
    poll();
  });
  poll();
});
