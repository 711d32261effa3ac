// broker chat: log in, read the room with the browser's own EventSource, post with fetch.
//
// Every message is one broker event named "chat" whose data is {"from", "text"}. The stream
// is opened with last_event_id=0, so the server replays the room's whole history first and
// then sends new messages live. When the connection drops (a server restart, a network blip),
// EventSource reconnects by itself and sends the Last-Event-ID header with the id of the last
// message it saw, so the server sends only what was missed.

// Where the API lives: ?api=http://host:port, by default a broker on this machine's port 8080.
const API = new URLSearchParams(location.search).get('api') || 'http://127.0.0.1:8080';

const $ = (selector) => document.querySelector(selector);
const seen = new Set(); // ids already shown, so a message is never shown twice
let session = null; // {username, jwt} once logged in
let stream = null; // the EventSource

function setStatus(state, text) {
  $('#status').dataset.state = state;
  $('#status').textContent = text;
}

function showError(text) {
  $('#error').textContent = text;
}

async function postJson(path, body, headers = {}) {
  const response = await fetch(API + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: JSON.stringify(body),
  });
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(reply.error || `${path} failed with ${response.status}`);
  return reply;
}

function addMessage(id, message) {
  if (seen.has(id)) return;
  seen.add(id);
  const item = document.createElement('li');
  item.dataset.id = id;
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = message.from; // textContent, never innerHTML: messages are untrusted
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = message.text;
  item.append(from, text);
  $('#messages').append(item);
}

function connect() {
  // EventSource cannot send an Authorization header, so the JWT goes in the query string.
  const url = `${API}/sse?access_token=${encodeURIComponent(session.jwt)}&last_event_id=0`;
  stream = new EventSource(url);
  stream.onopen = () => setStatus('live', `Live as ${session.username}. API: ${API}`);
  stream.addEventListener('chat', (event) => {
    addMessage(Number(event.lastEventId), JSON.parse(event.data));
  });
  stream.onerror = () => {
    if (stream.readyState === EventSource.CLOSED) {
      // The browser gave up (an HTTP error such as 401: the token expired or was revoked).
      setStatus('closed', 'Disconnected. Log in again.');
      $('#login').hidden = false;
    } else {
      setStatus('reconnecting', 'Connection lost, reconnecting…');
    }
  };
}

$('#login').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = event.target;
  showError('');
  try {
    const username = form.elements.username.value;
    const password = form.elements.password.value;
    const { jwt } = await postJson('/login', { username, password });
    session = { username, jwt };
    if (stream) stream.close();
    form.hidden = true;
    form.elements.password.value = '';
    $('#room').hidden = false;
    setStatus('connecting', 'Connecting…');
    connect();
  } catch (error) {
    showError(error.message);
  }
});

$('#send').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = event.target.elements.text;
  showError('');
  try {
    const data = { from: session.username, text: input.value };
    await postJson('/insert', { event: 'chat', data }, { Authorization: `Bearer ${session.jwt}` });
    input.value = ''; // the message itself appears when it comes back on the stream
  } catch (error) {
    showError(error.message);
  }
});

$('#api').textContent = API;
