"""Tokenizer folders and ref/tokenizers.json.

  * CLIP (tokenizer/, tokenizer_2/): the real OpenAI CLIP vocabulary, rebuilt exactly like
    open_clip / OpenAI SimpleTokenizer from bpe_simple_vocab_16e6.txt.gz and written as
    vocab.json + merges.txt (no tokenizer.json, like the published SD3 repos).  tokenizer/
    pads with <|endoftext|> (CLIP-L), tokenizer_2/ with "!" (CLIP-G).  The SDXL folders get the
    same two folders.
  * T5 (tokenizer_3/, SD3 only): a tiny Unigram model trained here with the `tokenizers`
    library.  Its tokenizer.json deliberately has NO normalizer, and the pre-tokenizer is
    Sequence[WhitespaceSplit, Metaspace("▁", prepend_scheme="always", split=True)], because that
    is exactly the pipeline transformers 5 rebuilds for T5Tokenizer (it keeps only the Unigram
    vocab and the post-processor from tokenizer.json, and a normalizer only if it is a
    SentencePiece `Precompiled` charsmap).  So `tokenizers.Tokenizer.from_file` and
    `AutoTokenizer.from_pretrained` agree (checked in tokenizer_reference).
"""

import gzip
import importlib.util
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, CLIPTokenizer

from .common import CLIP_MAX_LEN, T5_MAX_LEN, dump_json, tok_ids
from .corpus import T5_CORPUS, TOKENIZER_PROMPTS

T5_VOCAB_SIZE = 600
CLIP_VOCAB_SIZE = 49408


# --------------------------------------------------------------------------------------------
# CLIP tokenizer files (OpenAI SimpleTokenizer vocabulary).
# --------------------------------------------------------------------------------------------
def find_bpe_gz():
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip not found: pip install --no-deps open-clip-torch==3.3.0")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if p.is_file():
            return p
    sys.exit("bpe_simple_vocab_16e6.txt.gz not found in the open_clip package")


def bytes_to_unicode():
    """GPT-2 / OpenAI CLIP byte -> unicode map (same insertion order as the original)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_vocab():
    text = gzip.open(find_bpe_gz()).read().decode("utf-8")
    lines = text.split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == CLIP_VOCAB_SIZE
    return encoder, merges


def clip_special(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def clip_pad_special(pad_token):
    if pad_token == "<|endoftext|>":
        return clip_special(pad_token)
    return {"content": pad_token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_clip_vocab(folder, encoder, merges):
    # vocab.json in id order (like the published files); everything else with sort_keys.
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
        f.write("\n")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_clip_tokenizer(folder, encoder, merges, pad_token):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_vocab(folder, encoder, merges)
    pad_special = clip_pad_special(pad_token)
    dump_json(folder / "special_tokens_map.json", {
        "bos_token": clip_special("<|startoftext|>"),
        "eos_token": clip_special("<|endoftext|>"),
        "pad_token": pad_special,
        "unk_token": clip_special("<|endoftext|>"),
    })
    added = {
        "49406": dict(clip_special("<|startoftext|>"), special=True),
        "49407": dict(clip_special("<|endoftext|>"), special=True),
    }
    if pad_token != "<|endoftext|>":
        added[str(encoder[pad_token])] = dict(pad_special, special=True)
    dump_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": CLIP_MAX_LEN,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    })


# --------------------------------------------------------------------------------------------
# T5 tokenizer (tiny Unigram).
# --------------------------------------------------------------------------------------------
def t5_pipeline(tok):
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def canonical_unigram_vocab(vocab):
    """Make the trained Unigram vocabulary bit-reproducible.

    tokenizers' UnigramTrainer iterates Rust hash maps/sets with per-process random seeds, so
    (a) EM scores differ in the last ulp from run to run, and (b) the "required characters"
    that EM dropped are re-added with scores min_score + k*0.0001 in hash-set order.  The piece
    SET is stable; we fix (b) by re-assigning those scores in sorted-character order, (a) by
    rounding every score to 8 decimals, and then order pieces by (score desc, piece)."""
    specials, body = vocab[:3], vocab[3:]
    assert [p for p, _ in specials] == ["<pad>", "</s>", "<unk>"]
    delta = 0.0001
    m = min(s for _, s in body)
    synth = []
    for p, s in body:
        k = (s - m) / delta
        if len(p) == 1 and abs(k - round(k)) < 1e-6 and round(k) < len(body):
            synth.append(p)
    synth_scores = {p: m + i * delta for i, p in enumerate(sorted(synth))}
    body = [(p, round(synth_scores.get(p, s), 8)) for p, s in body]
    body.sort(key=lambda ps: (-ps[1], ps[0]))
    return [(p, 0.0) for p, _ in specials] + body


def train_t5_tokenizer():
    tok = t5_pipeline(Tokenizer(models.Unigram()))
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(T5_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    assert model["unk_id"] == 2 and not model.get("byte_fallback", False)
    vocab = canonical_unigram_vocab([(p, float(s)) for p, s in model["vocab"]])
    tok = t5_pipeline(Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False)))
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def t5_special(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_t5_tokenizer(folder, tok_json_str):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tokenizer.json", "w", encoding="utf-8") as f:
        f.write(tok_json_str)
    dump_json(folder / "special_tokens_map.json", {
        "eos_token": t5_special("</s>"), "pad_token": t5_special("<pad>"),
        "unk_token": t5_special("<unk>"),
    })
    dump_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {
            "0": dict(t5_special("<pad>"), special=True),
            "1": dict(t5_special("</s>"), special=True),
            "2": dict(t5_special("<unk>"), special=True),
        },
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 0,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })


# --------------------------------------------------------------------------------------------
# The tokenizer files of every model folder.
# --------------------------------------------------------------------------------------------
@dataclass
class TokenizerFiles:
    """What the tokenizer folders are written from: the CLIP vocabulary and the trained T5."""
    encoder: dict
    merges: list
    t5_json: str
    t5_vocab_size: int

    @classmethod
    def build(cls):
        encoder, merges = build_clip_vocab()
        t5_tok = train_t5_tokenizer()
        t5_json = t5_tok.to_str(pretty=True)
        assert train_t5_tokenizer().to_str(pretty=True) == t5_json, \
            "Unigram training is not deterministic"
        return cls(encoder, merges, t5_json, t5_tok.get_vocab_size())

    def write(self, model_dir, t5=True):
        """Replace whatever save_pretrained wrote for the tokenizers with the hand-written files:
        tokenizer/ (CLIP-L, pad <|endoftext|>), tokenizer_2/ (CLIP-G, pad "!") and, with t5,
        tokenizer_3/ (vocab.json + merges.txt for CLIP, no tokenizer.json)."""
        model_dir = Path(model_dir)
        subs = ("tokenizer", "tokenizer_2", "tokenizer_3") if t5 else ("tokenizer", "tokenizer_2")
        for sub in subs:
            if (model_dir / sub).exists():
                shutil.rmtree(model_dir / sub)
        write_clip_tokenizer(model_dir / "tokenizer", self.encoder, self.merges, "<|endoftext|>")
        write_clip_tokenizer(model_dir / "tokenizer_2", self.encoder, self.merges, "!")
        if t5:
            write_t5_tokenizer(model_dir / "tokenizer_3", self.t5_json)

    def load(self):
        """(CLIP-L, CLIP-G, T5) tokenizer objects, loaded by transformers from written folders."""
        with tempfile.TemporaryDirectory() as tmp:
            self.write(tmp)
            tok_l = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
            tok_g = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer_2")
            tok_t5 = AutoTokenizer.from_pretrained(Path(tmp) / "tokenizer_3")
        ids = tok_l("A hairy frog,").input_ids
        assert ids == [49406, 320, 26513, 11438, 267, 49407], ids
        assert tok_g.pad_token_id == 0 and tok_l.pad_token_id == 49407
        assert len(tok_t5) == self.t5_vocab_size, (len(tok_t5), self.t5_vocab_size)
        return tok_l, tok_g, tok_t5


# --------------------------------------------------------------------------------------------
# ref/tokenizers.json
# --------------------------------------------------------------------------------------------
def check_raw_t5(raw, prompt, entry):
    """transformers (reference) vs. raw `tokenizers` on tokenizer.json, same padding/truncation."""
    for n, key in ((CLIP_MAX_LEN, "t5_77"), (T5_MAX_LEN, "t5_256")):
        raw.enable_padding(pad_id=0, pad_token="<pad>", length=n)
        raw.enable_truncation(max_length=n)
        ids = raw.encode(prompt).ids
        if ids != entry[key]:
            raise SystemExit(f"T5 transformers/tokenizers mismatch for {prompt!r} at {n}:\n"
                             f"{entry[key]}\n{ids}")


def tokenizer_reference(pipe, t5_file):
    raw = Tokenizer.from_file(str(t5_file))
    entries = []
    for p in TOKENIZER_PROMPTS:
        e = {
            "prompt": p,
            "clip_l": tok_ids(pipe.tokenizer, [p], CLIP_MAX_LEN)[0].tolist(),
            "clip_g": tok_ids(pipe.tokenizer_2, [p], CLIP_MAX_LEN)[0].tolist(),
            "t5_77": tok_ids(pipe.tokenizer_3, [p], CLIP_MAX_LEN)[0].tolist(),
            "t5_256": tok_ids(pipe.tokenizer_3, [p], T5_MAX_LEN)[0].tolist(),
        }
        check_raw_t5(raw, p, e)
        entries.append(e)
    return {
        "max_length_clip": CLIP_MAX_LEN,
        "max_length_t5": [CLIP_MAX_LEN, T5_MAX_LEN],
        "note": "ids as produced by the SD3 pipeline tokenizers with padding='max_length', "
                "truncation=True (transformers " + transformers.__version__ + ")",
        "prompts": entries,
    }
