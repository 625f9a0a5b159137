"""The chat page's few browser-side snippets (gradio event `js=`). Formats and decisions stay in
Python; these only do what a browser alone can: clipboard, file download, scrolling, layout."""

# Copy as Markdown: the text comes from Python (ui_chats.to_markdown). Outside a secure context
# (plain http to another machine) navigator.clipboard is absent, so fall back to execCommand.
COPY = """(text) => { const done = () => { document.body.dataset.copied = text; };
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(done); return; }
  const t = document.createElement('textarea'); t.value = text; document.body.appendChild(t); t.select();
  document.execCommand('copy'); t.remove(); done(); }"""

# Export JSON: the file is made in the browser from Python's text (ui_chats.to_json), so no
# visitor's conversation is ever written on the server.
DOWNLOAD = """(text) => { if (!text) return; const name = (JSON.parse(text).title || 'chat')
  .replace(/[^\\w\\- ]+/g, '').trim().replace(/ +/g, '-').slice(0, 60) || 'chat';
  const a = document.createElement('a'); a.download = name + '.json';
  a.href = URL.createObjectURL(new Blob([text], {type: 'application/json'})); a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000); }"""

# Send: the text goes to the server as it is, and the box is emptied in the browser (an input
# event, so Gradio's own value follows), so what is typed next is never wiped by the reply. Only
# if the box still holds the text sent: Gradio runs this a few event-loop turns after Enter, and a
# next message typed in between (seen under load in CI) must not be emptied away.
TAKE_MESSAGE = """(text, box) => { const t = document.querySelector('#message textarea');
  if (t && t.value === text) { t.value = ''; t.dispatchEvent(new Event('input', {bubbles: true})); }
  return [text, box]; }"""

# The page is ready for the visitor once its stored conversation and settings are shown.
READY = "() => { document.body.dataset.ready = '1'; }"

# On load. (1) Gradio opens the sidebar at any width; on a phone it would cover the chat.
# (2) Following the answer down: Gradio's own autoscroll decides at each update and scrolls 300 ms
# later, so while tokens stream a reader who scrolls up is pulled back to the bottom. Here the
# chat follows only while the reader stays at the bottom: a scroll position above where we left
# it means they scrolled up (checked at each update too, as scroll events come a frame late);
# back at the bottom, or a new message in the chat, and it follows again.
ON_LOAD = """() => {
  if (window.innerWidth < 700) document.querySelector('#sidebar.open .toggle-button')?.click();
  const chat = document.querySelector('#chatbot');
  if (!chat || chat.dataset.follows) return;
  chat.dataset.follows = '1';
  let follow = true, last = 0, asked = 0;
  const wrap = () => chat.querySelector('.bubble-wrap');
  const atBottom = (w) => w.scrollTop + w.clientHeight >= w.scrollHeight - 24;
  chat.addEventListener('scroll', (e) => { const w = e.target; if (w !== wrap()) return;
    if (atBottom(w)) follow = true; else if (w.scrollTop < last - 1) follow = false;
    last = w.scrollTop; }, {capture: true, passive: true});
  new MutationObserver(() => { const w = wrap(); if (!w) return;
    const n = chat.querySelectorAll('[data-testid="user"]').length;
    if (n !== asked) { follow = true; asked = n; } else if (w.scrollTop < last - 1) follow = false;
    if (follow) w.scrollTop = w.scrollHeight;
    last = w.scrollTop;
  }).observe(chat, {childList: true, subtree: true, characterData: true});
}"""
