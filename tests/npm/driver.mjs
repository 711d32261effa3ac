// Drives a broker server the way a front end does: plain fetch for the JSON endpoints and the
// unmodified `broker-client` package (from the npm registry) for the event stream.
//
// broker-client 0.0.8 ships ES modules with extensionless imports (`from './utils'`) and a
// package.json without "type": "module", so Node cannot load it directly (Node 20 dropped
// --experimental-specifier-resolution). Front ends get it through a bundler, so we do the
// same: esbuild bundles this file and the package into one ES module (tests/test_npm_client.py
// does it in a temp dir; `npm run build` writes build/driver.mjs for trying it by hand). esbuild
// resolves './utils' as any bundler does; the package's code is used byte for byte. A custom
// Node loader would do too, but would be our own resolution rules rather than a bundler's.
//
// Usage (every command prints JSON lines on stdout):
//   node build/driver.mjs create_user BASE '{"username": ..., ...}'  -> {"status", "body"}
//   node build/driver.mjs login BASE USERNAME PASSWORD               -> {"status", "body"}
//   node build/driver.mjs subscribe URL AUTHORIZATION EVENT...       -> one line per callback
// `subscribe` opens the stream at URL (BASE/sse, with any query such as ?event=chat.*: a
// filter is part of the URL broker-client is given) with the Authorization header,
// registers a listener for each EVENT name and `onmessage`, and prints a line for
// every call of either ({"via": "listener"|"onmessage", "type", "data", "lastEventId"}). It runs
// until its stdin closes, then closes the stream and exits.
import BrokerClient from 'broker-client';

function emit(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

async function postJson(base, path, body) {
  const response = await fetch(base + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // Not JSON: report the raw text, the test decides.
  }
  return { status: response.status, body: parsed };
}

function record(via, messageEvent) {
  emit({
    via,
    type: messageEvent.type,
    data: messageEvent.data,
    lastEventId: messageEvent.lastEventId,
  });
}

function subscribe(url, authorization, eventNames) {
  // This is the call shown in broker-client's README: the auth header goes in fetch's init.
  const client = new BrokerClient(url, { headers: { authorization } });
  let opened = false;
  client.onopen = () => {
    // broker-client calls onopen on every chunk it reads; report only the first.
    if (!opened) emit({ via: 'onopen' });
    opened = true;
  };
  client.onclose = () => emit({ via: 'onclose' });
  client.onmessage = (event) => record('onmessage', event);
  for (const name of eventNames) {
    client.addEventListener(name, (event) => record('listener', event));
  }
  process.stdin.resume();
  process.stdin.on('end', () => {
    if (client.reader) client.close();
    process.exit(0);
  });
}

const [command, base, ...rest] = process.argv.slice(2);
if (command === 'create_user') {
  emit(await postJson(base, '/create_user', JSON.parse(rest[0])));
} else if (command === 'login') {
  emit(await postJson(base, '/login', { username: rest[0], password: rest[1] }));
} else if (command === 'subscribe') {
  subscribe(base, rest[0], rest.slice(1));
} else {
  console.error(`unknown command: ${command}`);
  process.exit(2);
}
