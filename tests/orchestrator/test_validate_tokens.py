"""`validate` of a token-head spec: the token cache's size, and a refusal when it cannot fit."""

import yaml

from test_validate_cli import validate
from tiny_models import TINY_VIT, TINY_VIT_ARCH, save_tiny_text_model


def _spec(tmp_path, size: int, head: str = "token_projector", text: str | None = None):
    text = text or f"hf:{save_tiny_text_model(tmp_path / 'bert', 'bert')}"
    spec = {"name": "tokens",
            "encoders": {"image": {"name": f"timm:{TINY_VIT_ARCH}", "options": {"pretrained": False, **TINY_VIT}},
                         "text": {"name": text, "options": {} if text.startswith("synthetic") else {"max_length": 8}}},
            "data": {"train": {"dataset": "synthetic", "split": "train", "options": {"size": size}},
                     "val": {"dataset": "synthetic", "split": "val", "options": {"size": 100}}},
            "search": [{"name": "tokens", "head": head, "layers": "last"}],
            "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_validate_prints_the_token_cache_size(tmp_path):
    out = validate(_spec(tmp_path, 1000))
    assert out.returncode == 0, out.stderr
    # a 32 px image in 8 px patches: 16 patches + the CLS token, 32 wide, fp16
    assert "17 tokens (1 prefix + 16 local) x 32 x 2 B = 1.09 kB per training pair, 1.09 MB for 1,000" in out.stdout
    # text: at most max_length tokens each (the texts are counted at run time), 16 wide
    assert "at most 8 tokens x 16 x 2 B = 256 B per training pair" in out.stdout, out.stdout
    assert "in all for one token layer per encoder" in out.stdout


def test_validate_refuses_a_token_cache_larger_than_the_free_space(tmp_path):
    out = validate(_spec(tmp_path, 10 ** 13))  # 1.34 kB per pair
    assert out.returncode == 2
    assert ":cache_dir: the training split's token cache needs 13,440 TB but" in out.stderr, out.stderr
    assert "point cache_dir at a larger disk" in out.stderr


def test_validate_refuses_a_token_head_on_an_encoder_without_tokens(tmp_path):
    out = validate(_spec(tmp_path, 1000, text="synthetic:text"))
    assert out.returncode == 2
    assert ":encoders.text.name: head 'token_projector' reads token features, and encoder " in out.stderr


def test_pooled_heads_print_no_token_cache(tmp_path):
    out = validate(_spec(tmp_path, 1000, head="linear"))
    assert out.returncode == 0 and "token cache" not in out.stdout
