"""A secret language: the built-in targets' corpus, drawn from a generator keyed by the node's data key.

Why not real text: a run's sandbox must see the Python installation to run at all, so a corpus cut
from text on the machine (the standard library's sources, the docs that ship with Python) can be
rebuilt inside the run, held-out split included, and trained on: a red-team candidate did exactly
that and came out `ok`/`trusted` with a third fewer bits per byte. Here the language itself (its
alphabet, spellings, vocabulary, grammar) and every sample are functions of a key only the host
reads (`SPEEDSEARCH_DATA_KEY`, hex; see env/data.py). A run gets its mounted training tokens and
nothing else of the distribution; the held-out streams are never mounted. This file being readable
tells a run the family, not the member: without the key it cannot draw one byte of the real text.

What a model can learn, coarse to fine, so small models show a real learning curve:
- a byte alphabet (a secret choice of letters, digits and symbols among the printable bytes);
- spellings: words drawn from a letter-bigram chain, a Zipf vocabulary per word class;
- grammar: a hidden Markov chain over word classes, one chain for each kind of document;
- layout (code): lines, indentation that opens after a block symbol and closes at random;
- in-context copying: each document has its own few names, spelled fresh, that recur through it.

Two kinds of document share the alphabet and the vocabulary: "code" (lines and indentation) and
"prose" (sentences and paragraphs). Documents start with a 0 byte (the targets' separator).
Generation is vectorised over many documents at once: about 10 M bytes a second on one core.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

KEY_ENV = "SPEEDSEARCH_DATA_KEY"
VERSION = 1  # in the DONE file; a change to what a key draws changes the data folders' names too
SEPARATOR = 0

LETTERS, DIGITS = 26, 10
WORDS = 4000  # vocabulary shared by both kinds
CLASSES = 24  # word classes, each with its own slice of the vocabulary
NAME_POOL = 20000  # spellings a document draws its own names from
NAMES_PER_DOC = 6
MAX_DEPTH = 6
LANES = 4096  # documents generated side by side


def key_from_env() -> bytes:
    """The data key the host passed to this prepare step; a prepare step without one is refused."""
    raw = os.environ.get(KEY_ENV, "")
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise SystemExit(f"prepare: {KEY_ENV} must hold the data key (hex, at least 16 bytes); "
                         "speedsearch sets it for the prepare step")
    return key


def _rng(key: bytes, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(b"speedsearch-language\0" + key + b"\0" + purpose.encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))


def _spell(rng: np.random.Generator, start: np.ndarray, bigram: np.ndarray, letters: np.ndarray,
           n: int, mean_len: float) -> list[bytes]:
    lengths = np.minimum(1 + rng.geometric(1 / mean_len, size=n), 12)
    out = []
    for length in lengths:
        c = rng.choice(LETTERS, p=start)
        word = [c]
        for _ in range(length - 1):
            c = rng.choice(LETTERS, p=bigram[c])
            word.append(c)
        out.append(bytes(letters[word].tolist()))
    return out


class Language:
    """The language of one key: its pieces (byte strings) and the two kinds' chains over them."""

    def __init__(self, key: bytes):
        rng = _rng(key, "language")
        printable = rng.permutation(np.arange(33, 127, dtype=np.uint8))  # space, newline: fixed
        letters, digits = printable[:LETTERS], printable[LETTERS:LETTERS + DIGITS]
        symbols = printable[LETTERS + DIGITS:]
        start = rng.dirichlet(np.full(LETTERS, 0.5))
        bigram = rng.dirichlet(np.full(LETTERS, 0.15), size=LETTERS)
        words = list(dict.fromkeys(_spell(rng, start, bigram, letters, WORDS * 2, 4.0)))[:WORDS]
        names = _spell(rng, start, bigram, letters, NAME_POOL, 6.0)

        # pieces: every token the chains emit is one of these byte strings (a word with its space)
        pieces: list[bytes] = [bytes([SEPARATOR])]
        self.word0 = len(pieces)
        pieces += [w + b" " for w in words]
        self.symbol0 = len(pieces)
        pieces += [bytes([s]) + b" " for s in symbols]
        self.number0 = len(pieces)
        pieces += [bytes(digits[rng.integers(0, DIGITS, size=rng.integers(1, 4))].tolist()) + b" "
                   for _ in range(200)]
        self.newline0 = len(pieces)  # newline then `depth` indents, depth 0..MAX_DEPTH
        pieces += [b"\n" + b"    " * d for d in range(MAX_DEPTH + 1)]
        self.name0 = len(pieces)
        pieces += [n + b" " for n in names]
        self.pieces = pieces
        self.block_symbol = self.symbol0  # the symbol that opens an indented block
        self.stop_symbol = self.symbol0 + 1  # prose: the end of a sentence

        # word classes: Zipf-weighted slices of the vocabulary (sizes vary), a few symbol classes,
        # a number class and the document's own names
        cuts = np.sort(rng.choice(np.arange(1, WORDS), size=CLASSES - 1, replace=False))
        slices = np.split(rng.permutation(WORDS) + self.word0, cuts)
        self.emit: list[tuple[np.ndarray, np.ndarray]] = []
        for ids in slices:
            p = 1.0 / np.arange(1, len(ids) + 1) ** 1.1
            self.emit.append((ids, p / p.sum()))
        n_sym = len(symbols)
        for group in np.array_split(rng.permutation(np.arange(2, n_sym)) + self.symbol0, 6):
            self.emit.append((group, rng.dirichlet(np.full(len(group), 0.3))))
        self.emit.append((np.arange(self.number0, self.newline0), np.full(200, 1 / 200)))
        self.NAME = len(self.emit)
        self.emit.append((np.zeros(1, dtype=np.int64), np.ones(1)))  # filled per document
        self.BLOCK = len(self.emit)
        self.emit.append((np.array([self.block_symbol]), np.ones(1)))
        self.END = len(self.emit)  # end of line (code) or of sentence (prose): no emission of its own
        self.n_states = self.END + 1
        self.chains = {"code": self._chain(rng, end_rate=0.12, name_rate=0.18, block_rate=0.05),
                       "prose": self._chain(rng, end_rate=0.07, name_rate=0.06, block_rate=0.0)}
        self.doc_lines = {"code": 40, "prose": 30}  # mean lines (code) or sentences (prose) a document

    def _chain(self, rng: np.random.Generator, end_rate: float, name_rate: float, block_rate: float) -> np.ndarray:
        """A sparse transition matrix over the states: each state leads to a few likely others."""
        s = self.n_states
        trans = np.zeros((s, s))
        for i in range(s):
            nxt = rng.choice(self.END, size=4, replace=False)
            trans[i, nxt] = rng.dirichlet(np.full(4, 0.7))
            trans[i] = 0.9 * trans[i] + 0.1 * rng.dirichlet(np.full(s, 0.2))
            trans[i, self.NAME] += name_rate
            trans[i, self.BLOCK] = block_rate
            trans[i, self.END] = end_rate
        trans[self.BLOCK] = 0.0
        trans[self.BLOCK, self.END] = 1.0  # a block symbol ends its line
        return trans / trans.sum(axis=1, keepdims=True)

    def tokens(self, kind: str, purpose: str, n_bytes: int, key: bytes) -> np.ndarray:
        """At least `n_bytes` of documents of `kind` (uint16 byte tokens), drawn from the stream named
        `purpose`: different purposes (train, dev, held-out) never share a document."""
        rng = _rng(key, f"sample:{kind}:{purpose}")
        chain = np.cumsum(self.chains[kind], axis=1)
        chain[:, -1] = 1.0
        lanes, out, total = LANES, [], 0
        lens = np.array([len(p) for p in self.pieces])
        while total < n_bytes:
            ids = self._draw(rng, chain, kind, lanes, steps=max(64, int(n_bytes / lanes / 5)))
            out.append(ids)
            total += int(lens[ids].sum())
        return self.render(np.concatenate(out))[:max(n_bytes, 0)]

    def _draw(self, rng: np.random.Generator, chain: np.ndarray, kind: str, lanes: int, steps: int) -> np.ndarray:
        """`steps` tokens in each of `lanes` streams, each stream a run of whole documents (the last
        one cut off), returned stream after stream."""
        code = kind == "code"
        grid = np.empty((lanes, steps), dtype=np.int64)
        state = np.full(lanes, self.END)
        depth = np.zeros(lanes, dtype=np.int64)
        names = rng.integers(0, NAME_POOL, size=(lanes, NAMES_PER_DOC)) + self.name0
        left = rng.geometric(1 / self.doc_lines[kind], size=lanes)  # lines left in each document
        fresh = np.ones(lanes, dtype=bool)  # a document starts: its separator first
        name_p = 1.0 / np.arange(1, NAMES_PER_DOC + 1)
        name_cum = np.cumsum(name_p / name_p.sum())
        for t in range(steps):
            tok = np.empty(lanes, dtype=np.int64)
            if fresh.any():
                tok[fresh] = SEPARATOR
                names[fresh] = rng.integers(0, NAME_POOL, size=(int(fresh.sum()), NAMES_PER_DOC)) + self.name0
                left[fresh] = rng.geometric(1 / self.doc_lines[kind], size=int(fresh.sum()))
                depth[fresh] = 0
                state[fresh] = self.END
            live = ~fresh
            u = rng.random(lanes)
            nxt = (chain[state] > u[:, None]).argmax(axis=1)
            state = np.where(live, nxt, state)
            for c in np.unique(state[live]):
                rows = live & (state == c)
                k = int(rows.sum())
                if c == self.END:
                    was_block = grid[rows, t - 1] == self.block_symbol if t else np.zeros(k, dtype=bool)
                    d = depth[rows]
                    if code:
                        d = np.where(was_block, np.minimum(d + 1, MAX_DEPTH),
                                     np.where(rng.random(k) < 0.25, np.maximum(d - 1, 0), d))
                        depth[rows] = d
                        tok[rows] = self.newline0 + d
                    else:  # a sentence ends; every fifth or so, the paragraph too
                        tok[rows] = np.where(rng.random(k) < 0.2, self.newline0, self.stop_symbol)
                    left[rows] -= 1
                elif c == self.NAME:
                    pick = np.searchsorted(name_cum, rng.random(k))
                    tok[rows] = names[rows, pick]
                else:
                    ids, p = self.emit[c]
                    tok[rows] = ids[rng.choice(len(ids), size=k, p=p)]
            grid[:, t] = tok
            fresh = live & (left <= 0)
        return grid.reshape(-1)

    def render(self, ids: np.ndarray) -> np.ndarray:
        """Token ids to bytes (uint16 tokens, vocabulary 256), without a Python loop over tokens."""
        flat = np.frombuffer(b"".join(self.pieces), dtype=np.uint8)
        lens = np.array([len(p) for p in self.pieces], dtype=np.int64)
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
        n = lens[ids]
        starts = np.repeat(offs[ids] - (np.cumsum(n) - n), n)
        return flat[starts + np.arange(int(n.sum()))].astype(np.uint16)
