"""Text data: plain text files -> byte-level BPE (HF ``tokenizers``) -> a memory-mapped token array.

Documents are separated by blank lines; each document ends with ``</s>``. The token ids of the
whole corpus are written once to ``<cache>/tokens.bin`` (uint16 or uint32) and read through
``np.memmap``; training samples are contiguous ``block_size``-token blocks that ignore document
boundaries (``sample_break_mode: none`` in the reference).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".raw")


def list_text_files(path: str | os.PathLike) -> list[Path]:
    """A text file, or every text file below a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text data {path} does not exist; pass --data a .txt file or a folder of them")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_EXTENSIONS)
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise ValueError(f"no non-empty text files ({', '.join(TEXT_EXTENSIONS)}) under {path}")
    return files


def documents(files: list[Path]):
    """Yield documents (blocks of lines separated by blank lines) from the files in order."""
    for f in files:
        doc: list[str] = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                doc.append(line.strip())
            elif doc:
                yield " ".join(doc)
                doc = []
        if doc:
            yield " ".join(doc)


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    """Train a byte-level BPE on ``files`` (RoBERTa-style special tokens) and save it as JSON."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(documents(files), vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS))
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return load_tokenizer(out)


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist; give a tokenizer.json or leave it unset to train one")
    return Tokenizer.from_file(str(path))


def corpus_key(files: list[Path], *extra: object) -> str:
    """A short hash of the files' names, sizes and mtimes (and settings) naming a token cache."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def build_token_cache(
    files: list[Path], cache_dir: Path, vocab_size: int = 50_265, tokenizer_path: str | None = None
) -> Path:
    """Tokenize ``files`` once into ``cache_dir/<key>/tokens.bin`` (+ meta.json, tokenizer.json).

    The cache is keyed by the data files' paths, sizes and mtimes and by the tokenizer's content
    (or the vocabulary size it is trained with). Written under a temporary name and renamed, so an
    interrupted build is never mistaken for a finished one. Returns the cache folder.
    """
    # By the tokenizer's content, not its path: a tokenizer.json replaced in place is a new vocabulary.
    given = load_tokenizer(tokenizer_path) if tokenizer_path else None  # a missing file is a clear error first
    tokenizer_digest = hashlib.sha1(Path(tokenizer_path).read_bytes()).hexdigest() if tokenizer_path else None
    key = corpus_key(files, vocab_size, tokenizer_digest)
    folder = cache_dir / key
    if (folder / "meta.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok_file = folder / "tokenizer.json"
    tokenizer = given if given is not None else train_tokenizer(files, vocab_size, tok_file)
    if tokenizer_path:
        tokenizer.save(str(tok_file))
    eos = tokenizer.token_to_id("</s>")
    ids: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for enc in tokenizer.encode_batch(batch):
            ids.append(np.asarray(enc.ids + ([eos] if eos is not None else []), dtype=np.int64))
        batch.clear()

    for doc in documents(files):
        batch.append(doc)
        if len(batch) == 1024:
            flush()
    flush()
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = folder / "tokens.bin.tmp"
    tokens.astype(dtype).tofile(tmp)
    os.replace(tmp, folder / "tokens.bin")
    meta = {"num_tokens": int(tokens.size), "dtype": np.dtype(dtype).name, "vocab_size": vocab,
            "pad_id": tokenizer.token_to_id("<pad>"), "files": [str(f) for f in files]}
    (folder / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(folder / "meta.json.tmp", folder / "meta.json")
    return folder


TOKEN_DTYPES = ("uint16", "uint32")


def read_meta(folder: Path) -> dict:
    """A token cache's ``meta.json``, checked before ``tokens.bin`` is memory-mapped with its dtype: an
    object dtype would make numpy read pointers out of the file (a planted cache could crash the run, or
    worse), and a short file would be read past its end."""
    path = folder / "meta.json"
    fix = f"delete {folder} and it is rebuilt from the text"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # a JSON error, a bad encoding, or absurd nesting
        raise ValueError(f"token cache {path} is not valid JSON ({type(e).__name__}); {fix}") from None
    ints = ("num_tokens", "vocab_size")
    if (not isinstance(meta, dict) or meta.get("dtype") not in TOKEN_DTYPES
            or not all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) and meta[k] >= 0 for k in ints)
            or not isinstance(meta.get("pad_id"), (int, type(None)))):  # fmt: skip
        raise ValueError(f"token cache {path} is not one d2v2 wrote (it needs a dtype of {' or '.join(TOKEN_DTYPES)} "
                         f"and whole num_tokens and vocab_size); {fix}")  # fmt: skip
    tokens = folder / "tokens.bin"
    expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    if not tokens.is_file() or tokens.stat().st_size != expected:
        size = tokens.stat().st_size if tokens.is_file() else 0
        raise ValueError(f"token cache {tokens} holds {size} bytes, not the {expected} its meta.json names; {fix}")
    return meta


def model_fields(vocab_size: int, pad_id: int | None, mask_id: int | None, block_size: int) -> dict:
    """Model config fields text data decides: the vocabulary, padding and ``<mask>`` ids follow the
    tokenizer, the positions cover a block (a method whose config has no such field ignores it)."""
    return {"vocab_size": vocab_size, "padding_idx": pad_id, "mask_idx": mask_id, "max_positions": max(block_size, 512)}


class TokenBlockDataset(torch.utils.data.Dataset):
    """Contiguous ``block_size``-token blocks of a token cache; item ``(index, seed)`` -> {"source": [L]}."""

    def __init__(self, cache_folder: str | os.PathLike, block_size: int = 512):
        folder = self.folder = Path(cache_folder)
        self.meta = read_meta(folder)
        self.block_size = block_size
        self.vocab_size = self.meta["vocab_size"]
        self.pad_id = self.meta.get("pad_id")
        self.mask_id = load_tokenizer(folder / "tokenizer.json").token_to_id("<mask>")
        n = self.meta["num_tokens"]
        if n < block_size:
            raise ValueError(
                f"the text corpus has {n} tokens, fewer than one block of {block_size}; "
                "give more text or a smaller block (--set data.block_size=N)"
            )
        self.tokens = np.memmap(folder / "tokens.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))

    def __len__(self) -> int:
        return self.tokens.shape[0] // self.block_size

    def model_fields(self) -> dict:
        """Model config fields this data decides (``model_fields``), from its tokenizer."""
        return model_fields(self.vocab_size, self.pad_id, self.mask_id, self.block_size)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, _seed = item
        start = index * self.block_size
        block = np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64)
        return {"source": torch.from_numpy(block), "index": index}
