// broker chat: log in, read the room with the browser's own EventSource, post with fetch.
//
// Every message is one broker event named "chat" whose data is {"from", "text"}. The stream
// is opened with last_event_id=0, so the server replays the room's whole history first and
// then sends new messages live. When the connection drops (a server restart, a network blip),
// EventSource reconnects by itself and sends the Last-Event-ID header with the id of the last
// message it saw, so the server sends only what was missed.
//
// Rooms (optional): logged in with a room, say "lobby", the page posts events named
// "chat.lobby" and opens its stream with ?event=chat.lobby, so the server sends it that
// room's messages only: its history, its missed messages on a reconnect (EventSource reuses
// the URL, filter included) and its live ones. Without a room the page is the shared room of
// before: events named "chat" on an unfiltered stream.

// Where the API lives: ?api=http://host:port, by default a broker on this machine's port 8080.
// ?room=NAME fills in the room field.
const PARAMS = new URLSearchParams(location.search);
const API = PARAMS.get('api') || 'http://127.0.0.1:8080';

const $ = (selector) => document.querySelector(selector);
const seen = new Set(); // ids already shown, so a message is never shown twice
let session = null; // {username, jwt, room, event} once logged in
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
  const query = new URLSearchParams({ access_token: session.jwt, last_event_id: '0' });
  if (session.room) query.append('event', session.event); // this room's messages only
  stream = new EventSource(`${API}/sse?${query}`);
  const where = session.room ? ` in room ${session.room}` : '';
  stream.onopen = () => setStatus('live', `Live as ${session.username}${where}. API: ${API}`);
  stream.addEventListener(session.event, (event) => {
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
    const room = form.elements.room.value; // checked by the field's pattern: \w{1,64}
    const { jwt } = await postJson('/login', { username, password });
    session = { username, jwt, room, event: room ? `chat.${room}` : 'chat' };
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
    const auth = { Authorization: `Bearer ${session.jwt}` };
    await postJson('/insert', { event: session.event, data }, auth);
    input.value = ''; // the message itself appears when it comes back on the stream
  } catch (error) {
    showError(error.message);
  }
});

$('#api').textContent = API;
$('#login').elements.room.value = PARAMS.get('room') || '';
