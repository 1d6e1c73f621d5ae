"""Build a tiny random-weight sentence-transformer that loads like ``BAAI/bge-small-en-v1.5``.

Model hubs are unreachable here, yet the sentence-transformers caption encoder must run in tests
and offline smoke runs.  This trains a small WordPiece tokenizer on a built-in word list, saves a
tiny random ``BertModel`` with it, and wraps both as a sentence-transformer (mean pooling, unit
vectors) saved with ``save``: every consumer then calls ``SentenceTransformer(folder)``, the path
a real checkpoint takes.  Its vectors are meaningless but deterministic (fixed seed).
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

BUILD_NAME = "tiny-text-v2"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = """
street road avenue lane boulevard alley path sidewalk crossing bridge tunnel square plaza park
garden tree trees leafy green grass hedge flower river canal lake harbour beach hill mountain
house houses home apartment tower building buildings shop shops store market cafe restaurant bar
church school station train tram bus car cars truck taxi bicycle bike motorbike parking traffic
light lights lamp sign wall fence gate door window roof brick stone concrete glass steel wood
old new modern historic tall low wide narrow long short empty busy quiet crowded clean dirty
bright dark sunny cloudy rainy snowy wet dry night day morning evening summer winter spring
people person man woman child children dog cat bird walking running sitting standing riding
red blue yellow white black grey brown orange purple pink colourful painted graffiti poster
city town village suburb downtown centre district neighbourhood corner block row line view
safe unsafe wealthy poor lively boring beautiful ugly depressing pleasant calm noisy rich
with without near next along under over across between behind front side of the a an and or
"""


def ensure_tiny_text(cache_dir: str | Path, seed: int = 0) -> str:
    """Build the tiny model once (into a temp folder, renamed into place); its folder."""
    root = Path(cache_dir) / BUILD_NAME / f"mmrag-tiny-text-seed{seed}"
    if (root / "modules.json").is_file():
        return str(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(tmp, seed)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return str(root)


def _build(out: Path, seed: int) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    bert_dir = out / "bert"
    BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    encoder = Transformer(str(bert_dir), max_seq_length=128)
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[encoder, pooling, Normalize()], device="cpu").save(str(out))
    shutil.rmtree(bert_dir)


def _vocab() -> dict[str, int]:
    """Special tokens, every character (alone and as a ``##`` continuation), then the words of
    ``_WORDS``: built, not trained, so the same on every machine (the WordPiece trainer orders
    equal-count pieces differently from run to run)."""
    words = sorted(set(_WORDS.lower().split()))
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits))
    tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars), *words]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def _train_tokenizer():
    """A lower-casing WordPiece tokenizer over ``_vocab()``, as a fast BERT tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    unk, pad, cls_, sep_, mask = SPECIAL_TOKENS[1], *SPECIAL_TOKENS[:1], *SPECIAL_TOKENS[2:]
    tok = Tokenizer(models.WordPiece(vocab=_vocab(), unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad,
                                   cls_token=cls_, sep_token=sep_, mask_token=mask,
                                   model_max_length=128)
