"""Tiny, offline, deterministic tokenizer and model for tests and examples (random weights, ~1k vocab)."""

from __future__ import annotations

from pathlib import Path

from imtune.masking.templates import CHAT_TEMPLATES

# The chatml template exactly as imtune renders it (one source: masking/templates.py).
CHATML_TEMPLATE = CHAT_TEMPLATES["chatml"]

_CORPUS = """The quick brown fox jumps over the lazy dog. Instruction tuning trains a language model on prompts and
responses. Write a poem about the sea. Explain why the sky is blue. def add(a, b): return a + b
What is 2 + 2? The answer is 4. Translate to French: hello -> bonjour. Summarise the following text in one sentence.
Naïve café déjà vu — ünïcödé test 你好 世界 مرحبا 🙂 tabs\tand\nnewlines.
"""


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 600):
    """Byte-level BPE (any unicode encodes), EOS, chat template; saved with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 600, hidden_size: int = 32,
                    num_layers: int = 2):
    """A tiny Llama with random weights plus the tiny tokenizer, saved as safetensors in `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer(out_dir, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model, tok


def put_in_hub_cache(hf_home: str | Path, repo_id: str, files_dir: str | Path, commit: str = "0" * 39 + "1") -> Path:
    """Lay the files of `files_dir` out as huggingface_hub's cache does for `repo_id` at `commit` (blobs named by
    content hash, snapshot entries as relative symlinks, refs/main), so `HF_HOME=hf_home` finds it offline."""
    import hashlib
    import os

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(files_dir).rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(files_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def pickle_only_copy(model_dir: str | Path, out_dir: str | Path) -> Path:
    """The model's files with its safetensors weights swapped for a `pytorch_model.bin` (never loaded: refused)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    (out / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return out


def run_in_hf_home(args, hf_home, token: str, offline: bool = True, **env):
    """`python *args` in a clean environment whose HF cache is `hf_home` (offline unless told), with `token` as
    HF_TOKEN, one thread: what a user's shell with that cache would run."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE"))}
    e.update(HF_HOME=str(hf_home), HF_TOKEN=token, PYTHONPATH=str(root / "src") + os.pathsep + str(root),
             OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", IMTUNE_CACHE=str(Path(hf_home) / "imtune"), **env)
    if offline:
        e["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=300)
