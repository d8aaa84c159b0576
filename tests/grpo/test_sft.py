"""SFT packing: rows are filled in order, and the packed loss and gradients equal the
unpacked ones (dense and MoE), which plain concatenation would not give; the grpo-sft
command on a dataset and on a built-in task."""

from __future__ import annotations

import json

import pytest
import torch

import grpo.cli.sft
from grpo.cli.sft import build_parser, run
from grpo.models import load_model, make_tiny
from grpo.sft import encode_pair, pack, run_sft, sft_loss, sft_loss_packed

PAIRS = [("12+3\n", "<think>2+3=5, 1+0=1</think><answer>15</answer>"),
         ("1+1\n", "<answer>2</answer>"),
         ("", "no prompt at all"),
         ("99+99\n", "<think>9+9=18, 9+9+1=19</think><answer>198</answer>"),
         ("sort 5 3\n", "<think>3<5</think><answer>3 5</answer>")]


def test_pack_fills_rows_in_order():
    assert pack([3, 4, 2, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert pack([3, 4, 1, 2], 10) == [[0, 1, 2, 3]]
    assert pack([12], 8) == [[0]]  # too long for a row: alone, not cut


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_packed_loss_equals_unpacked_loss(tmp_path, kind):
    model, tok = load_model(make_tiny(tmp_path / kind, kind=kind, hidden=32), dtype=torch.float32)
    model.eval()  # no dropout: the two forwards must see the same network
    unpacked = sft_loss(model, tok, PAIRS)
    grads = torch.autograd.grad(unpacked, [p for p in model.parameters() if p.requires_grad])
    for length in (40, 80, 1000):  # several rows, two per row, all in one row
        packed = sft_loss_packed(model, tok, PAIRS, length)
        assert packed.item() == pytest.approx(unpacked.item(), rel=1e-5)
        packed_grads = torch.autograd.grad(packed, [p for p in model.parameters()
                                                    if p.requires_grad])
        for a, b in zip(grads, packed_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # Without the block mask and position reset the examples would see each other.
    ids = torch.tensor([sum((encode_pair(tok, p, c)[0] for p, c in PAIRS), [])])
    naive = model(input_ids=ids).logits
    own = model(input_ids=ids[:, :len(encode_pair(tok, *PAIRS[0])[0])]).logits
    assert torch.allclose(naive[:, :own.shape[1]], own, atol=1e-5)  # first example: same
    second = encode_pair(tok, *PAIRS[1])[0]
    alone = model(input_ids=torch.tensor([second])).logits[0]
    start = own.shape[1]
    assert not torch.allclose(naive[0, start:start + len(second)], alone, atol=1e-3)


def test_run_sft_with_packing_trains(tmp_path):
    model, tok = load_model(make_tiny(tmp_path / "m", hidden=32), dtype=torch.float32)
    before = sft_loss(model, tok, PAIRS).item()
    run_sft(model, tok, PAIRS, steps=8, lr=3e-3, batch_size=5, warmup=1, show_progress=False,
            packing=64)
    with torch.no_grad():
        assert sft_loss(model, tok, PAIRS).item() < before
    with pytest.raises(ValueError, match="packing length"):
        run_sft(model, tok, PAIRS, steps=1, lr=1e-3, batch_size=2, packing=0)


def sft_command(argv: list[str]) -> None:
    """grpo-sft without main's error handling: bad input raises ValueError."""
    print(run(build_parser().parse_args(argv)))


def test_sft_command_trains_and_saves(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+1", "completion":
                                         f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>"})
                             + "\n" for i in range(10)))
    assert grpo.cli.sft.main(["--data", str(pairs), "--steps", "3", "--batch-size", "4",
                              "--output-dir", str(tmp_path / "out")]) == 0
    assert "final loss" in capsys.readouterr().out
    model, tok = load_model(tmp_path / "out", dtype=torch.float32)
    assert model.config.model_type == "qwen2" and tok.eos_token_id is not None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1"}\n')
    assert grpo.cli.sft.main(["--data", str(bad), "--output-dir", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "grpo-sft: error:" in err and f"{bad}:1: needs a string 'completion'" in err
    with pytest.raises(ValueError, match="needs a string 'completion'"):
        sft_command(["--data", str(bad), "--output-dir", str(tmp_path / "out2")])
    assert grpo.cli.sft.main(["--model", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a directory with a config.json" in capsys.readouterr().err


def test_sft_command_on_a_task_skips_held_out_prompts(tmp_path, monkeypatch):
    from grpo import data as data_mod
    from grpo.tasks import make_task

    trained = []
    monkeypatch.setattr(grpo.cli.sft, "run_sft",
                        lambda model, tok, pairs, **kw: trained.extend(pairs) or 0.0)
    grpo.cli.sft.main(["--task-args", '{"operators": "+"}', "--eval-size", "500", "--steps",
                       "20", "--batch-size", "50", "--tiny-hidden", "16", "--tiny-layers", "1",
                       "--output-dir", str(tmp_path / "out")])
    held_out, _ = data_mod.task_splits(make_task("arithmetic", operators="+"), 0, 500)
    prompts = {p.rstrip("\n") for p, _ in trained}
    assert len(trained) == 1000 and all("+" in p for p in prompts)
    assert not prompts & {e["prompt"] for e in held_out}
