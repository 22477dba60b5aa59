"""configs/generate_text.py: text from a prompt through a checkpoint's own tokenizer.json and the
whole model. The tokenizer is built here (a word-level vocabulary with BOS/EOS), saved beside the
golden tiny DeepSeek-V2 checkpoint; nothing is downloaded."""

import json
import shutil

import jax.numpy as jnp
import pytest

import mla_jax
from configs import generate_text as generate_text_config
from experiments import generate_text, harness
from helpers import GOLDEN_DIR

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home"]


def write_tokenizer(path):
  """A word-level tokenizer: <unk> 0, <s> 1 (BOS, prepended), </s> 2 (EOS), then WORDS, then
  filler words up to the golden model's vocabulary of 512."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for word in WORDS + [f"w{i}" for i in range(512 - 3 - len(WORDS))]:
    vocab[word] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.add_special_tokens(["<unk>", "<s>", "</s>"])  # decode skips them
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  tok.save(str(path / "tokenizer.json"))
  return tok


@pytest.fixture
def checkpoint(tmp_path):
  for name in ("config.json", "model.safetensors"):
    shutil.copy(GOLDEN_DIR / name, tmp_path / name)
  return tmp_path


def config_for(checkpoint, **fields):
  config = generate_text_config.get_config()
  config.update(dict(checkpoint=str(checkpoint), prompt="the cat sat on", max_new_tokens=5,
                     dtype="float32", backend="xla") | fields)
  return config


def test_generates_the_models_greedy_tokens_as_text(checkpoint, tmp_path):
  """The text is the model's greedy continuation of the encoded prompt (BOS first), decoded."""
  tok = write_tokenizer(checkpoint)
  results = generate_text.run(config_for(checkpoint), str(tmp_path / "out"))
  row = results["rows"][0]
  assert row["prompt_ids"] == [1] + [WORDS.index(w) + 3 for w in "the cat sat on".split()]
  lm = mla_jax.load_hf_model(checkpoint, dtype=jnp.float32, backend="xla")
  tokens, _ = mla_jax.generate(lm, jnp.asarray([row["prompt_ids"]], jnp.int32), 5)
  want = generate_text.until_eos([int(t) for t in tokens[0]], {2})
  assert row["new_ids"] == want and row["text"] == tok.decode(want)
  assert row["full_text"] == " ".join(["the cat sat on", row["text"]]).strip()
  assert row["prefill_s"] > 0 and results["status"] == "complete"
  text = (tmp_path / "out" / "generate_text.md").read_text()
  assert "> the cat sat on" in text


def test_stops_at_the_end_of_sequence_token():
  assert generate_text.until_eos([5, 7, 2, 9, 2], {2}) == [5, 7]
  assert generate_text.until_eos([5, 7], {2}) == [5, 7]
  assert generate_text.until_eos([5, 100001, 7], {2, 100001}) == [5]


def test_a_checkpoint_without_tokenizer_or_prompt_is_refused(checkpoint, tmp_path):
  with pytest.raises(harness.ConfigError, match="no tokenizer.json"):
    generate_text.run(config_for(checkpoint), str(tmp_path))
  write_tokenizer(checkpoint)
  with pytest.raises(harness.ConfigError, match="prompt"):
    generate_text.run(config_for(checkpoint, prompt=""), str(tmp_path))
  with pytest.raises(harness.ConfigError, match="checkpoint"):
    generate_text.run(config_for("", prompt="the"), str(tmp_path))


def test_eos_ids_read_one_or_a_list(checkpoint):
  assert generate_text.eos_ids(str(checkpoint)) == {2}  # the golden config's
  cfg = json.loads((checkpoint / "config.json").read_text())
  (checkpoint / "config.json").write_text(json.dumps(cfg | {"eos_token_id": [2, 7]}))
  assert generate_text.eos_ids(str(checkpoint)) == {2, 7}
