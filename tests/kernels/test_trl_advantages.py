"""group_advantages against TRL itself: TRL 1.16's GRPOTrainer._generate_and_score_completions
(the only entry point that runs its advantage code) on a tiny random Qwen2 on the CPU, with two
weighted reward functions that return predetermined values per completion, None included, so
that some completions are unscorable (every function returned None), one group is entirely,
one has a single scorable completion, one has a function that never applies and one has
equal rewards. TRL's advantages must equal ours from the same rewards with None as NaN; with
None counted as reward 0 (our rule before TRL 1.16's) this test fails."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
packaging_version = pytest.importorskip("packaging.version")

from grpo.kernels import group_advantages  # noqa: E402
from grpo.kernels.reference import group_advantages_ref  # noqa: E402
from grpo.models.tiny import char_tokenizer  # noqa: E402

from .helpers import assert_close  # noqa: E402

if packaging_version.Version(trl.__version__) < packaging_version.Version("1.16"):
    pytest.skip(
        f"TRL {trl.__version__}: the unscorable rule came with 1.16", allow_module_level=True
    )

WEIGHTS = [1.0, 0.5]


def _reward_table(group_size: int, prompts: int, seed: int) -> list[list[float | None]]:
    """(prompts * group_size) rows of 2 rewards, multiples of 0.25 (sums exact, so equal
    groups are exactly equal in TRL too); None where the function does not apply."""
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randint(-4, 5, (prompts, group_size, 2), generator=gen) / 4
    none = torch.rand((prompts, group_size, 2), generator=gen) < 0.25
    none[:5] = False
    none[0, 1] = True  # group 0: one unscorable completion
    none[1] = True  # group 1: all unscorable
    none[2, 1:] = True  # group 2: a single scorable completion
    none[3, :, 0] = True  # group 3: only the second function applies
    vals[4] = torch.tensor([0.5, 0.5])  # group 4: equal rewards and an unscorable completion
    none[4, -1] = True
    vals, none = vals.reshape(-1, 2).tolist(), none.reshape(-1, 2).tolist()
    return [[None if none[i][j] else vals[i][j] for j in range(2)] for i in range(len(vals))]


def _trl_advantages(table, group_size: int, scale: str, tmp_path) -> tuple[torch.Tensor, dict]:
    tok = char_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)

    def column(j):
        def reward(completions, **kwargs):  # called once with every completion, in order
            assert len(completions) == len(table)
            return [row[j] for row in table]

        reward.__name__ = f"reward_{j}"
        return reward

    n = len(table)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_completion_length=3,
        num_generations=group_size,
        per_device_train_batch_size=n,
        reward_weights=WEIGHTS,
        scale_rewards=scale,
        save_strategy="no",
        seed=0,
    )
    prompts = ["1+1="] * (n // group_size)
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[column(0), column(1)],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
    )
    trainer.model.train()
    # The sampler repeats each prompt group_size times in a row: completion i is in group i // G.
    out = trainer._generate_and_score_completions([{"prompt": "1+1="} for _ in range(n)])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return out["advantages"].float().cpu(), metrics


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size, prompts, seed", [(4, 7, 0), (3, 6, 1)])
def test_advantages_match_trl(tmp_path, scale, group_size, prompts, seed):
    table = _reward_table(group_size, prompts, seed)
    trl_adv, trl_metrics = _trl_advantages(table, group_size, scale, tmp_path)
    rewards = torch.tensor([[torch.nan if v is None else v for v in row] for row in table])
    weights = torch.tensor(WEIGHTS)
    adv, stats = group_advantages(rewards, group_size, weights=weights, scale=scale)
    gold, _ = group_advantages_ref(rewards, group_size, weights=weights, scale=scale)
    assert_close(gold, trl_adv, "reference vs TRL", atol=1e-5)
    assert_close(adv, trl_adv, "group_advantages vs TRL", atol=1e-5)
    assert stats["reward_mean"].item() == pytest.approx(trl_metrics["reward"], rel=1e-5)
    if scale != "batch":  # TRL's "batch" counts the batch std as zero or not, ours the groups'
        assert stats["frac_zero_std"].item() == pytest.approx(trl_metrics["frac_reward_zero_std"])
    assert adv[1] == 0 and trl_adv[1] == 0  # the unscorable completion of group 0
    assert (adv.view(prompts, group_size)[1:3] == 0).all()  # none, or one, scorable
