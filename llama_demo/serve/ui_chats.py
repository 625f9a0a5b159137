"""The chat page's conversations as plain data: what the browser keeps (gr.BrowserState, the
visitor's own localStorage: the server holds no one's chats), and the same as Markdown or JSON.

A store is {"current": id or None, "chats": [chat, ...]} with the newest first; a chat is
{"id", "title", "messages": [message, ...]}. A message is Gradio's {"role", "content"} with
content as plain text; an answer's stats line follows it as an assistant message whose metadata
has a title (Gradio draws it as a folded note under the answer), never sent to the model."""
from __future__ import annotations

import json
import secrets

EXPORT_FORMAT = "llama_demo-chat"  # the "format" field of an exported conversation
MAX_IMPORT_BYTES = 8 * 2**20
MAX_IMPORT_MESSAGES = 4096
TITLE_CHARS = 48  # a new chat's title: its first question, cut to this


class NotAConversation(ValueError):
    """An imported file is not a conversation; the message says what was wrong."""


def text_of(content) -> str:
    """Text of a Chatbot message: a string, or (Gradio 6) a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return ""


def is_stats(message: dict) -> bool:
    return bool((message.get("metadata") or {}).get("title"))


def plain(message: dict) -> dict:
    """A Chatbot message as the store keeps it: role, text, and a stats note's metadata title."""
    out = {"role": message.get("role"), "content": text_of(message.get("content"))}
    if is_stats(message):
        out["metadata"] = {"title": str(message["metadata"]["title"]), "status": "done"}
    return out


def leads(ahead: list[dict], shown: list[dict]) -> bool:
    """Whether `ahead` is `shown` carried further: the same messages, the last one maybe grown and
    maybe more after it (what the server has sent that the browser had not drawn yet)."""
    if not ahead or len(ahead) < len(shown):
        return False
    if not shown:
        return True
    ahead, shown = [plain(m) for m in ahead[:len(shown)]], [plain(m) for m in shown]
    return ahead[:-1] == shown[:-1] and ahead[-1]["role"] == shown[-1]["role"] \
        and ahead[-1]["content"].startswith(shown[-1]["content"])


def stats_message(line: str, details: str) -> dict:
    return {"role": "assistant", "content": details, "metadata": {"title": line, "status": "done"}}


def new_store() -> dict:
    return {"current": None, "chats": []}


def _store(store) -> dict:
    """A stored value as a store (a browser may hold anything under the key, e.g. an old layout)."""
    if not isinstance(store, dict) or not isinstance(store.get("chats"), list):
        return new_store()
    chats = [c for c in store["chats"] if isinstance(c, dict) and isinstance(c.get("messages"), list) and c.get("id")]
    return {"current": store.get("current"), "chats": chats}


def current(store) -> dict | None:
    store = _store(store)
    return next((c for c in store["chats"] if c["id"] == store["current"]), None)


def title_for(messages: list[dict]) -> str:
    first = next((text_of(m.get("content")) for m in messages if m.get("role") == "user"), "").strip()
    first = " ".join(first.split()) or "New chat"
    return first if len(first) <= TITLE_CHARS else first[:TITLE_CHARS - 1] + "…"


def save(store, messages: list[dict]) -> dict:
    """The store with the current chat's messages replaced (a chat with none yet is created, titled
    by its first question); the saved chat moves to the top of the list."""
    store = _store(store)
    messages = [plain(m) for m in messages]
    chat = current(store)
    if chat is None:
        if not messages:
            return store
        chat = {"id": secrets.token_hex(6), "title": title_for(messages), "messages": []}
    chat = dict(chat, messages=messages)
    others = [c for c in store["chats"] if c["id"] != chat["id"]]
    return {"current": chat["id"], "chats": [chat] + others}


def open_chat(store, chat_id: str | None) -> dict:
    store = _store(store)
    known = any(c["id"] == chat_id for c in store["chats"])
    return dict(store, current=chat_id if known else None)


def rename(store, title: str) -> dict:
    store = _store(store)
    title = " ".join(str(title).split())[:200]
    if not title or current(store) is None:
        return store
    return dict(store, chats=[dict(c, title=title) if c["id"] == store["current"] else c for c in store["chats"]])


def delete(store) -> dict:
    """The store without the current chat; the next one down (or none) becomes current."""
    store = _store(store)
    ids = [c["id"] for c in store["chats"]]
    if store["current"] not in ids:
        return store
    i = ids.index(store["current"])
    rest = [c for c in store["chats"] if c["id"] != store["current"]]
    return {"current": rest[min(i, len(rest) - 1)]["id"] if rest else None, "chats": rest}


def choices(store) -> list[tuple[str, str]]:
    """(title, id) of every chat, for the sidebar's list."""
    return [(c.get("title") or "Untitled", c["id"]) for c in _store(store)["chats"]]


def to_markdown(title: str, messages: list[dict], model: str) -> str:
    """The conversation as Markdown: a heading per turn, answers as the model wrote them, each
    answer's stats line in italics under it."""
    out = [f"# {title}", ""]
    for m in messages:
        text = text_of(m.get("content")).strip()
        if is_stats(m):
            out += [f"*{m['metadata']['title']}*", ""]
        elif m.get("role") == "user":
            out += ["## You", "", text, ""]
        else:
            out += [f"## {model}", "", text, ""]
    return "\n".join(out).rstrip() + "\n"


def to_json(chat: dict | None, messages: list[dict], model: str, settings: dict) -> str:
    """The conversation as an export file: what the page needs to reopen it, and the settings it was
    answered with."""
    title = (chat or {}).get("title") or title_for(messages)
    return json.dumps({"format": EXPORT_FORMAT, "version": 1, "title": title, "model": model, "settings": settings,
                       "messages": [plain(m) for m in messages]}, ensure_ascii=False, indent=1)


def from_json(data: bytes | str) -> tuple[str, list[dict]]:
    """(title, messages) of an exported conversation; also takes an OpenAI-style {"messages": [...]}
    or a bare list of messages (system messages are left out: the page's system prompt is a setting)."""
    if len(data) > MAX_IMPORT_BYTES:
        raise NotAConversation(f"the file is over {MAX_IMPORT_BYTES // 2**20} MB: not a conversation export")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise NotAConversation(f"the file is not JSON ({e}): choose a conversation exported from this page") from None
    raw = doc.get("messages") if isinstance(doc, dict) else doc
    if not isinstance(raw, list) or not raw:
        raise NotAConversation('the file has no "messages" list: choose a conversation exported from this page')
    if len(raw) > MAX_IMPORT_MESSAGES:
        raise NotAConversation(f"the file has {len(raw)} messages; at most {MAX_IMPORT_MESSAGES} can be imported")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise NotAConversation(f'message {i} has no role "user" or "assistant"')
        if not isinstance(m.get("content"), (str, list)):
            raise NotAConversation(f"message {i} has no text content")
        if m["role"] != "system":
            messages.append(plain(m))
    if not any(m["role"] == "user" for m in messages):
        raise NotAConversation("the file's conversation has no user message")
    title = doc.get("title") if isinstance(doc, dict) and isinstance(doc.get("title"), str) else ""
    return (" ".join(title.split())[:200] or title_for(messages)), messages


def add_imported(store, title: str, messages: list[dict]) -> dict:
    """The store with an imported conversation added on top, as the current chat."""
    store = _store(store)
    chat = {"id": secrets.token_hex(6), "title": title, "messages": messages}
    return {"current": chat["id"], "chats": [chat] + store["chats"]}
