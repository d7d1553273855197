"""`rlhf-jax demo`: the whole RLHF pipeline on a laptop, with no downloads.

SFT on imperfect demonstrations -> a reward model trained on preference pairs labelled by a
hidden "gold" rule -> PPO against the learned reward model; then a before/after table (gold score,
reward-model score, KL to the reference, length, gold win rate of PPO over SFT), sample
completions, PNG curves, `summary.json` and the three models in HF format. See `task.py` for the
task and the gold rule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import core, models
from rlhf_jax.algorithms import PPOConfig
from rlhf_jax.demo import task
from rlhf_jax.reward_model import (
    PreferenceBatch,
    make_rm_step,
    normalize_head,
    pair_scores,
    reward_init_from_policy,
)
from rlhf_jax.sampling import SamplingConfig, generate
from rlhf_jax.sft import SFTBatch, TrainConfig, init_train_state, make_sft_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes and step counts of the demo (the defaults finish in a few minutes on 2 CPU cores)."""

    hidden_size: int = 64
    num_layers: int = 2
    sft_examples: int = 4096
    sft_steps: int = 200
    sft_lr: float = 3e-3
    rm_prompts: int = 2048
    rm_steps: int = 250
    rm_lr: float = 1e-3
    ppo_iterations: int = 40
    ppo_batch: int = 64
    ppo_lr: float = 1e-3
    eval_prompts: int = 512
    eval_every: int = 5
    batch_size: int = 64
    temperature: float = 0.7


def model_config(config: DemoConfig) -> models.ModelConfig:
    return models.ModelConfig(
        family="llama",
        vocab_size=len(task.VOCAB),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=4,
        num_kv_heads=4,
        head_dim=config.hidden_size // 4,
        intermediate_size=4 * config.hidden_size,
        max_position_embeddings=64,
        tie_embeddings=True,
        pad_token_id=task.PAD,
        bos_token_id=task.BOS,
        eos_token_id=task.EOS,
    )


def _batches(rng: np.random.Generator, n: int, batch: int, steps: int):
    """Indices of `steps` batches, reshuffled every epoch."""
    order = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch]
        order = order[batch:]


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=True)


def run_demo(
    out_dir: str | Path = "demo_out",
    seed: int = 0,
    *,
    config: DemoConfig | None = None,
    progress: bool = True,
    save_models: bool = True,
) -> dict[str, Any]:
    """Runs SFT -> reward model -> PPO, writes the outputs into `out_dir`, returns the summary."""
    config = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    policy_config = model_config(config)
    t_start = time.time()
    history: dict[str, list] = {}

    # ------------------------------------------------------------------------------- 1. SFT
    prompts, prompt_mask, subjects = task.sample_prompts(rng, config.sft_examples)
    demos = task.sample_demonstrations(rng, subjects)
    tokens = np.concatenate([prompts, demos], axis=1)
    loss_mask = np.zeros_like(tokens, bool)
    loss_mask[:, task.PROMPT_LEN :] = demos != task.PAD
    sft_train = TrainConfig(learning_rate=config.sft_lr, total_steps=config.sft_steps)
    key, init_key = jax.random.split(key)
    state = init_train_state(models.init_params(policy_config, init_key), sft_train)
    sft_step = jax.jit(make_sft_step(policy_config, sft_train), donate_argnums=0)
    bar = _bar(config.sft_steps, "1/3 SFT", progress)
    for idx in _batches(rng, len(tokens), config.batch_size, config.sft_steps):
        batch = SFTBatch(tokens[idx], tokens[idx] != task.PAD, loss_mask[idx])
        state, metrics = sft_step(state, batch)
        history.setdefault("sft_loss", []).append(float(metrics["loss"]))
        bar.set_postfix(loss=f"{history['sft_loss'][-1]:.3f}")
        bar.update()
    bar.close()
    sft_params = state.params

    sample = jax.jit(
        functools.partial(generate, model_config=policy_config), static_argnames="sampling_config"
    )

    def draw(params, prompts_, mask_, key_, temperature):
        cfg = SamplingConfig(
            max_new_tokens=task.RESPONSE_LEN,
            temperature=temperature,
            stop_token_ids=(task.EOS,),
            pad_token_id=task.PAD,
        )
        return sample(
            params,
            prompt_tokens_BP=prompts_,
            prompt_mask_BP=mask_,
            key=key_,
            sampling_config=cfg,
        )

    # ---------------------------------------------------------------------- 2. reward model
    prompts, prompt_mask, subjects = task.sample_prompts(rng, config.rm_prompts)
    key, k1, k2 = jax.random.split(key, 3)
    first = np.asarray(draw(sft_params, prompts, prompt_mask, k1, 1.0).tokens)
    second = np.asarray(draw(sft_params, prompts, prompt_mask, k2, 1.0).tokens)
    gold_first, gold_second = task.gold_score(first, subjects), task.gold_score(second, subjects)
    keep = gold_first != gold_second
    first_wins = (gold_first > gold_second)[keep, None]
    chosen = np.where(first_wins, first[keep], second[keep])
    rejected = np.where(first_wins, second[keep], first[keep])
    pair_prompts = prompts[keep]
    chosen_seq = np.concatenate([pair_prompts, chosen], axis=1)
    rejected_seq = np.concatenate([pair_prompts, rejected], axis=1)
    n_pairs = len(chosen_seq)
    n_eval = max(n_pairs // 10, 1)
    eval_idx, train_idx = np.arange(n_eval), np.arange(n_eval, n_pairs)

    def pairs(idx):
        c, r = chosen_seq[idx], rejected_seq[idx]
        loss_mask = np.zeros_like(c, bool)
        loss_mask[:, task.PROMPT_LEN :] = chosen[idx] != task.PAD
        return PreferenceBatch(c, c != task.PAD, r, r != task.PAD, loss_mask)

    reward_params, reward_config = reward_init_from_policy(sft_params, policy_config, init_key)
    rm_train = TrainConfig(learning_rate=config.rm_lr, total_steps=config.rm_steps)
    rm_state = init_train_state(reward_params, rm_train)
    rm_step = jax.jit(make_rm_step(reward_config, rm_train), donate_argnums=0)
    bar = _bar(config.rm_steps, "2/3 reward model", progress)
    for idx in _batches(rng, len(train_idx), config.batch_size, config.rm_steps):
        rm_state, metrics = rm_step(rm_state, pairs(train_idx[idx]))
        history.setdefault("rm_loss", []).append(float(metrics["loss"]))
        history.setdefault("rm_accuracy", []).append(float(metrics["accuracy"]))
        bar.set_postfix(loss=f"{history['rm_loss'][-1]:.3f}", acc=f"{metrics['accuracy']:.2f}")
        bar.update()
    bar.close()
    held_out = pairs(eval_idx)
    c_scores, r_scores, _ = jax.jit(pair_scores, static_argnums=1)(
        rm_state.params, reward_config, held_out
    )
    rm_accuracy = float(np.mean(np.asarray(c_scores) > np.asarray(r_scores)))
    # lm-human-preferences: normalise the head so SFT samples score mean 0, std 1.
    reference = np.concatenate([pair_prompts, first[keep]], axis=1)[:512]
    ref_scores = models.sequence_scores(
        rm_state.params,
        reward_config,
        reference,
        np.cumsum(reference != task.PAD, 1) - (reference != task.PAD),
        reference != task.PAD,
    )[:, 0]
    reward_params, norm_stats = normalize_head(rm_state.params, reward_config, ref_scores)

    # ------------------------------------------------------------------------------- 3. PPO
    ppo_config = PPOConfig(
        batch_size=config.ppo_batch,
        response_length=task.RESPONSE_LEN,
        temperature=config.temperature,
        stop_token_ids=(task.EOS,),
        pad_token_id=task.PAD,
        missing_eos_penalty=1.0,
        num_mini_batches=2,
        learning_rate=config.ppo_lr,
        value_learning_rate=config.ppo_lr,
        total_iterations=config.ppo_iterations,
    )
    rl_models = core.RLModels(policy=policy_config, value=reward_config, reward=reward_config)
    ppo_state = core.init_state(sft_params, ppo_config, rl_models, value_params=reward_params)
    frozen = core.FrozenParams(ref=sft_params, reward=reward_params)
    iteration = core.jit_iteration(ppo_config, rl_models)
    eval_prompts, eval_mask, eval_subjects = task.sample_prompts(rng, config.eval_prompts)
    key, eval_key = jax.random.split(key)

    @jax.jit
    def rate(params, tokens, mask):
        """Reward-model scores and summed KL(policy || SFT) of sampled responses."""
        args = (eval_prompts, eval_mask, tokens, mask)
        scores = core.reward_scores(reward_params, reward_config, *args)
        logp, _ = core.policy_logprobs(params, policy_config, *args, temperature=config.temperature)
        ref, _ = core.policy_logprobs(
            sft_params, policy_config, *args, temperature=config.temperature
        )
        return scores, jnp.sum(jnp.where(mask, logp - ref, 0.0), axis=1)

    def evaluate(params):
        gen = draw(params, eval_prompts, eval_mask, eval_key, config.temperature)
        responses = np.asarray(gen.tokens)
        scores, kl = rate(params, gen.tokens, gen.mask)
        return {
            "responses": responses,
            "gold": task.gold_score(responses, eval_subjects),
            "rm_score": np.asarray(scores),
            "kl": np.asarray(kl),
            "length": np.asarray(gen.sequence_lengths) + 1,
        }

    before = evaluate(sft_params)
    history["eval_iteration"], history["eval_gold"] = [0], [float(before["gold"].mean())]
    bar = _bar(config.ppo_iterations, "3/3 PPO", progress)
    for i in range(config.ppo_iterations):
        prompts, prompt_mask, _ = task.sample_prompts(rng, config.ppo_batch)
        key, step_key = jax.random.split(key)
        ppo_state, metrics = iteration(ppo_state, frozen, prompts, prompt_mask, step_key)
        core.check_finite(metrics, i)
        for name in ("objective/scores", "objective/kl", "policy/entropy_avg", "loss/value_avg"):
            history.setdefault(name, []).append(float(metrics[name]))
        if (i + 1) % config.eval_every == 0 or i + 1 == config.ppo_iterations:
            history.setdefault("eval_iteration", []).append(i + 1)
            history.setdefault("eval_gold", []).append(
                float(evaluate(ppo_state.policy_params)["gold"].mean())
            )
        bar.set_postfix(
            score=f"{history['objective/scores'][-1]:.2f}", kl=f"{history['objective/kl'][-1]:.2f}"
        )
        bar.update()
    bar.close()
    after = evaluate(ppo_state.policy_params)

    # --------------------------------------------------------------------------- report
    wins = float(np.mean(after["gold"] > before["gold"]))
    ties = float(np.mean(after["gold"] == before["gold"]))
    table = {
        name: {
            "gold_score": float(res["gold"].mean()),
            "reward_model_score": float(res["rm_score"].mean()),
            "kl_to_reference": float(res["kl"].mean()),
            "response_length": float(res["length"].mean()),
        }
        for name, res in (("sft", before), ("ppo", after))
    }
    summary = {
        "table": table,
        "gold_win_rate_ppo_vs_sft": wins,
        "gold_tie_rate": ties,
        "reward_model_heldout_accuracy": rm_accuracy,
        "reward_model_pairs": int(n_pairs),
        "reward_head_normalisation": norm_stats,
        "samples": [
            {
                "prompt": task.decode(eval_prompts[i]),
                "sft": task.decode(before["responses"][i]),
                "sft_gold": float(before["gold"][i]),
                "ppo": task.decode(after["responses"][i]),
                "ppo_gold": float(after["gold"][i]),
            }
            for i in range(6)
        ],
        "seconds": round(time.time() - t_start, 1),
        "seed": seed,
        "config": dataclasses.asdict(config),
    }
    _print_report(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    _plot(history, out / "curves.png")
    if save_models:
        tokenizer = task.hf_tokenizer()
        models.save(sft_params, policy_config, out / "models" / "sft", tokenizer=tokenizer)
        models.save(reward_params, reward_config, out / "models" / "reward", tokenizer=tokenizer)
        models.save(
            ppo_state.policy_params, policy_config, out / "models" / "ppo", tokenizer=tokenizer
        )
    print(
        f"\nwrote {out}/summary.json, curves.png"
        + (" and models/{sft,reward,ppo}" if save_models else "")
    )
    return summary


def _print_report(summary: dict[str, Any]) -> None:
    rows = [
        ("gold score", "gold_score"),
        ("reward-model score", "reward_model_score"),
        ("KL to reference", "kl_to_reference"),
        ("response length", "response_length"),
    ]
    table = summary["table"]
    print(f"\n{'':22s}{'SFT':>10s}{'PPO':>10s}")
    for label, name in rows:
        print(f"{label:22s}{table['sft'][name]:10.3f}{table['ppo'][name]:10.3f}")
    print(
        f"\nPPO beats SFT on the gold rule in {summary['gold_win_rate_ppo_vs_sft']:.0%} of prompts "
        f"(ties {summary['gold_tie_rate']:.0%}); reward model held-out pairwise accuracy "
        f"{summary['reward_model_heldout_accuracy']:.0%}"
    )
    print("\nsample completions (gold score):")
    for s in summary["samples"]:
        print(f"  {s['prompt']}")
        print(f"    SFT [{s['sft_gold']:+.0f}] {s['sft']}")
        print(f"    PPO [{s['ppo_gold']:+.0f}] {s['ppo']}")


def _plot(history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    axes[0, 0].plot(history["sft_loss"])
    axes[0, 0].set(title="SFT loss", xlabel="step")
    axes[0, 1].plot(history["rm_loss"], label="loss")
    axes[0, 1].plot(history["rm_accuracy"], label="accuracy")
    axes[0, 1].set(title="reward model", xlabel="step")
    axes[0, 1].legend()
    axes[1, 0].plot(history["objective/scores"], label="reward-model score")
    axes[1, 0].plot(history["eval_iteration"], history["eval_gold"], "o-", label="gold (eval)")
    axes[1, 0].set(title="PPO", xlabel="iteration")
    axes[1, 0].legend()
    axes[1, 1].plot(history["objective/kl"], label="KL to reference")
    axes[1, 1].plot(history["policy/entropy_avg"], label="entropy")
    axes[1, 1].set(title="PPO", xlabel="iteration")
    axes[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
