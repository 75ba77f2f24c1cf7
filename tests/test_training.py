"""The trainer: exact resume, crash-safe checkpoints, optimizer groups, schedule, eval, generate, CLI."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from rank_processes import start_server

from bmojo_neuron import BMojoConfig, BMojoForCausalLM, cli
from bmojo_neuron.checkpoints import layout, local
from bmojo_neuron.checkpoints.inference import load_trained
from bmojo_neuron.data import build_datasets
from bmojo_neuron.data.mqar import mqar_accuracy
from bmojo_neuron.device import resolve_device
from bmojo_neuron.evaluation import evaluate, repack
from bmojo_neuron.generation import generate_text
from bmojo_neuron.recipes import Recipe
from bmojo_neuron.training import TrainResult, Trainer, train
from bmojo_neuron.training.backends.local import LocalBackend
from bmojo_neuron.training.data_order import DataOrder
from bmojo_neuron.training.objective import causal_lm_loss
from bmojo_neuron.training.optim import (build_optimizer, build_scheduler, describe_lr_multipliers, lr_factor,
                                         parameter_groups)

TINY_MODEL = dict(
    hidden_size=16, num_hidden_layers=2, layer_pattern="MB", num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=32, window_size=4, fading_window=4, memory_chunk=4, memory_size=4, memory_picks=1,
    ssm_state_size=8, ssm_head_dim=8, ssm_chunk_size=16,
)
# 40 examples / batch 4 = 10 micro-batches per epoch: 6 steps x 2 accum cross an epoch boundary.
TINY_RECIPE = {
    "run": {"name": "tiny", "seed": 3, "device": "cpu"},
    "model": TINY_MODEL,
    "data": {"kind": "mqar", "vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "train_examples": 40,
             "eval_examples": 16, "seed": 1},
    "optim": {"lr": 1e-2, "warmup_steps": 2, "min_lr_ratio": 0.1},
    "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "log_every": 1},
    "eval": {"every": 3, "batches": 2, "length_multipliers": [1]},
    "checkpoint": {"every": 3, "keep_last": 2},
}


def tiny_recipe(**overrides) -> Recipe:
    return Recipe.from_dict(TINY_RECIPE).with_overrides(overrides) if overrides else Recipe.from_dict(TINY_RECIPE)


def train_losses(records: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r["type"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> TrainResult:
    """One uninterrupted tiny run, shared by the tests that need a trained model."""
    return train(tiny_recipe(), tmp_path_factory.mktemp("reference"), progress=False)


# ------------------------------------------------------------------------- resume


def test_resume_equals_uninterrupted(reference, tmp_path):
    run_dir = tmp_path / "run"
    first = train(tiny_recipe(), run_dir, progress=False, stop_after=3)
    assert first.final_dir is None and first.step == 3
    assert layout.latest_checkpoint(run_dir).name == "step-0000003"
    second = train(tiny_recipe(), run_dir, resume=True, progress=False)

    expected = train_losses(reference.metrics)
    assert [s for s, _, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert train_losses(second.metrics) == expected  # bitwise: floats compared with ==
    on_disk = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert train_losses(on_disk) == expected
    a = BMojoForCausalLM.from_pretrained(reference.final_dir).state_dict()
    b = BMojoForCausalLM.from_pretrained(second.final_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The time reported is the whole run's: the first attempt's up to its checkpoint, then the second's.
    kept = json.loads((run_dir / "step-0000003" / layout.STATE_FILE).read_text())["seconds"]
    assert 0 < kept <= first.seconds and second.seconds > kept
    assert json.loads((run_dir / "step-0000006" / layout.STATE_FILE).read_text())["seconds"] <= second.seconds


def _without_clock(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.fixture
def forked_workers(monkeypatch):
    """The run pool's workers forked from the suite's preloaded fork server (`rank_processes`), not spawned: a
    spawned worker imports torch and the package afresh, 10-20 s on two busy cores. The pool's bookkeeping is
    the same either way; a spawned pool's start-up is tested by the signal test below."""
    from bmojo_neuron.training import run_pool

    start_server()
    monkeypatch.setattr(run_pool, "START_METHOD", "forkserver")


def test_runs_trained_at_once_equal_runs_trained_alone(reference, tmp_path, forked_workers):
    """`run.jobs`: runs trained in worker processes log the numbers they log alone."""
    from bmojo_neuron.training.run_pool import train_in_processes

    runs = [(tiny_recipe(), tmp_path / "a"), (tiny_recipe(**{"run.seed": 4, "run.name": "other"}), tmp_path / "b")]
    pooled = train_in_processes(runs, jobs=2)
    assert [r.run_dir for r in pooled] == [tmp_path / "a", tmp_path / "b"]
    assert _without_clock(pooled[0].metrics) == _without_clock(reference.metrics)
    assert train_losses(pooled[1].metrics) != train_losses(reference.metrics)  # its own seed, its own run
    assert all(r.final_dir is not None and (r.final_dir / "model.safetensors").is_file() for r in pooled)


def test_a_failing_run_stops_the_pool_and_is_named(tmp_path, forked_workers):
    from bmojo_neuron.training.run_pool import RunFailed, train_in_processes

    bad = tiny_recipe(**{"run.name": "diverges", "optim.lr": 1e6, "optim.warmup_steps": 0, "train.log_every": 1})
    long = tiny_recipe(**{"run.name": "long", "train.steps": 100000, "checkpoint.every": 100000})
    with pytest.raises(RunFailed, match="diverges: FloatingPointError: training loss is") as failed:
        train_in_processes([(bad, tmp_path / "bad"), (long, tmp_path / "long")], jobs=2)
    assert layout.list_checkpoints(tmp_path / "long")  # stopped at a step boundary with a checkpoint
    # the worker's own exception came along, so the command words it as for a single run: one line
    assert failed.value.run_name == "diverges" and isinstance(failed.value.error, FloatingPointError)
    from bmojo_neuron.cli import user_error

    assert user_error(failed.value) == f"diverges: {failed.value.error}"
    assert str(failed.value.error).startswith("training loss is")
    assert user_error(RunFailed("crashed: KeyError: 'x'\nTraceback ...", "crashed", KeyError("x"))) is None  # a bug


def test_a_signal_while_the_workers_start_stops_each_at_its_first_step_with_a_checkpoint(tmp_path):
    """SIGTERM reaches the pool while its workers still import torch: none dies half-started; each
    stops after its first step with a checkpoint, as a worker already training would."""
    import threading

    from bmojo_neuron.training.run_pool import train_in_processes

    runs = [(tiny_recipe(**{"run.name": name, "train.steps": 100000, "checkpoint.every": 100000}), tmp_path / name)
            for name in ("first", "second")]
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))  # a spawned worker takes seconds to start
    timer.start()
    results = train_in_processes(runs, jobs=2)
    timer.join()
    assert [r.stop_signal for r in results] == [signal.SIGTERM, signal.SIGTERM]
    for result, (_, run_dir) in zip(results, runs):
        assert layout.latest_checkpoint(run_dir).name == f"step-{result.step:07d}" and result.step >= 1


def test_request_stop_ends_the_run_at_a_step_boundary_with_a_checkpoint(reference, tmp_path):
    """`Trainer.request_stop` (what a signal handler calls) mid-step: the step finishes, a checkpoint is written,
    no export; the resumed run is the uninterrupted one, bitwise."""
    recipe, run_dir = tiny_recipe(), tmp_path / "run"
    backend = LocalBackend(recipe)
    trainer = Trainer(recipe, backend, run_dir, progress=False)
    steps = []

    def step_then_stop(*args):
        steps.append(len(steps) + 1)
        if len(steps) == 2:
            trainer.request_stop()
        return LocalBackend.step(backend, *args)

    backend.step = step_then_stop
    stopped = trainer.run()
    assert stopped.step == 2 and stopped.final_dir is None and steps == [1, 2]
    assert layout.latest_checkpoint(run_dir).name == "step-0000002"  # not a checkpoint.every step
    resumed = train(tiny_recipe(), run_dir, resume=True, progress=False)
    assert train_losses(resumed.metrics) == train_losses(reference.metrics)


def _tensorboard_steps(run_dir) -> dict[str, list[int]] | None:
    """The steps of each TensorBoard scalar in `run_dir`, as TensorBoard shows them (purged events dropped)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in ("train/loss", "eval/eval_loss")}


def test_stops_between_log_steps_resume_to_the_uninterrupted_runs_records(reference, tmp_path):
    """Stopped at steps 2 and 3 of a 4-step log window and resumed twice, the run logs what the uninterrupted
    run logs: one record at step 4 averaging steps 1-4, one at 6 averaging 5-6, bitwise on CPU (the window's
    rows travel in the checkpoint). Each stop shows its partial window in metrics.jsonl until the resume."""
    recipe, run_dir = tiny_recipe(**{"train.log_every": 4, "checkpoint.every": 6}), tmp_path / "run"
    per_step = {r["step"]: r for r in reference.metrics if r["type"] == "train"}  # log_every 1: every step

    def window(steps: range) -> dict:
        """The uninterrupted run's record at the window's last step: its per-step numbers averaged (float32,
        as the step computes them), its lr and token count."""
        names = ["loss", "lm_loss", "aux_loss", "grad_norm"]
        means = torch.tensor([[per_step[s][k] for k in names] for s in steps]).mean(0).tolist()
        last = per_step[steps[-1]]
        return {"type": "train", "step": last["step"], **dict(zip(names, means)), "lr": last["lr"],
                "tokens": last["tokens"]}

    def on_disk() -> list[dict]:
        return _without_clock([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])

    evals = {r["step"]: r for r in reference.metrics if r["type"] == "eval"}
    train(recipe, run_dir, progress=False, stop_after=2)
    assert on_disk() == [window(range(1, 3))]
    train(recipe, run_dir, resume=True, progress=False, stop_after=3)
    assert on_disk() == [window(range(1, 4)), evals[3]]  # step 2's partial record replaced by the longer one
    resumed = train(recipe, run_dir, resume=True, progress=False)

    expected = [evals[3], window(range(1, 5)), window(range(5, 7)), evals[6]]
    assert _without_clock(resumed.metrics) == expected  # bitwise: floats compared with ==
    assert on_disk() == expected
    shown = _tensorboard_steps(run_dir)
    assert shown is None or shown == {"train/loss": [4, 6], "eval/eval_loss": [3, 6]}


def test_the_objective_is_what_the_step_minimises(reference, tmp_path):
    """A backend calls its objective once per micro-batch; the default one is the model's causal-LM loss."""
    recipe, calls = tiny_recipe(), []

    def counted(model, input_ids, labels):
        calls.append(input_ids.shape)
        return causal_lm_loss(model, input_ids, labels)

    result = Trainer(recipe, LocalBackend(recipe, counted), tmp_path / "run", progress=False).run()
    t = recipe.train
    assert calls == [(t.batch_size, recipe.data.seq_len)] * (t.steps * t.grad_accum)
    assert train_losses(result.metrics) == train_losses(reference.metrics)


def test_resume_refuses_a_changed_recipe_and_a_used_dir(reference):
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_recipe(), reference.run_dir, progress=False)
    with pytest.raises(ValueError, match="optim.lr"):
        train(tiny_recipe(**{"optim.lr": 0.5}), reference.run_dir, resume=True, progress=False)


def test_bad_device_fails_before_work(tmp_path):
    assert resolve_device("neuron") == torch.device("xla")  # trained by the Neuron backend
    recipe = tiny_recipe()
    recipe.run.device = "tpu"
    with pytest.raises(ValueError, match="run.device"):
        train(recipe, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ checkpoints


def test_failure_during_training_save_then_resume(reference, tmp_path, monkeypatch):
    """A crash inside the step-6 save leaves step 3 as latest; resuming reproduces the reference run."""
    run_dir = tmp_path / "run"
    real = local.save_model
    calls = []

    def flaky(model, filename, *args, **kwargs):
        calls.append(filename)
        real(model, filename, *args, **kwargs)
        if len(calls) == 2:
            raise RuntimeError("killed while saving")

    monkeypatch.setattr(local, "save_model", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_recipe(), run_dir, progress=False)
    monkeypatch.setattr(local, "save_model", real)
    assert (run_dir / "latest").read_text().strip() == "step-0000003"
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["step-0000003"]
    assert not (run_dir / "final").exists()
    resumed = train(tiny_recipe(), run_dir, resume=True, progress=False)
    assert train_losses(resumed.metrics) == train_losses(reference.metrics)


# ------------------------------------------------------------- optimizer, schedule


def test_parameter_groups():
    config = BMojoConfig(**{**TINY_MODEL, "vocab_size": 32, "layer_pattern": "MBF", "num_hidden_layers": 3})
    model = BMojoForCausalLM(config)
    mamba1 = BMojoForCausalLM(BMojoConfig(**{**TINY_MODEL, "vocab_size": 32, "ssm_mixer": "mamba1"}))
    for m in (model, mamba1):
        decay, no_decay = parameter_groups(m, 0.1)
        names = dict(m.named_parameters())
        assert sorted(decay["names"] + no_decay["names"]) == sorted(names)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        for name in no_decay["names"]:
            assert names[name].ndim == 1 or name.endswith(("A_log", ".D", "dt_bias")), name
        for name in decay["names"]:
            assert names[name].ndim >= 2 and not name.endswith(("A_log", ".D", "dt_bias")), name
        assert any(n.endswith("mixer_norm.weight") for n in no_decay["names"])
        assert any(n.endswith("embed_tokens.weight") for n in decay["names"])
        assert all(any(n.endswith(s) for n in no_decay["names"]) for s in ("A_log", ".D", "dt_bias"))
    a_log = [n for n in parameter_groups(mamba1, 0.1)[1]["names"] if n.endswith("A_log")]
    assert a_log and all(dict(mamba1.named_parameters())[n].ndim == 2 for n in a_log)  # 2-D, still no decay
    optimizer = build_optimizer(model, 1e-3, 0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.defaults["foreach"] is False


def test_lr_multipliers_give_the_matched_parameters_their_own_rate_through_the_schedule():
    """Each pattern's parameters form decay / no-decay groups at lr x factor; the rest keep lr;
    the warmup + cosine schedule scales every group by the same factor."""
    config = BMojoConfig(**{**TINY_MODEL, "vocab_size": 32, "layer_pattern": "BM", "num_hidden_layers": 2})
    model = BMojoForCausalLM(config)
    names = dict(model.named_parameters())
    lr, factors = 3e-3, {r"mixer\.[qkvo]_proj": 0.33, "ssm_residual": 10.0, "no_such_parameter": 2.0}
    groups = parameter_groups(model, 0.1, lr, factors)
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["decay", "decay:mixer\\.[qkvo]_proj", "no_decay", "no_decay:ssm_residual"]
    assert sorted(sum((g["names"] for g in groups), [])) == sorted(names)  # every parameter exactly once
    attn = by_name["decay:mixer\\.[qkvo]_proj"]
    assert sorted(attn["names"]) == sorted(n for n in names if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert attn["lr"] == pytest.approx(lr * 0.33, rel=1e-12) and attn["weight_decay"] == 0.1
    gain = by_name["no_decay:ssm_residual"]
    assert gain["names"] == ["model.layers.0.mixer.ssm_residual_gain"]  # the M layer has no gain
    assert gain["lr"] == pytest.approx(lr * 10, rel=1e-12) and gain["weight_decay"] == 0.0
    assert "lr" not in by_name["decay"] and "lr" not in by_name["no_decay"]  # the optimiser's lr
    assert not any("q_proj" in n or "ssm_residual" in n for n in by_name["decay"]["names"] + by_name["no_decay"]["names"])
    assert {g["name"]: g["lr_pattern"] for g in groups} == {
        "decay": None, "no_decay": None, "decay:mixer\\.[qkvo]_proj": r"mixer\.[qkvo]_proj",
        "no_decay:ssm_residual": "ssm_residual"}
    # without multipliers: the two plain groups, as before
    assert [g["name"] for g in parameter_groups(model, 0.1)] == ["decay", "no_decay"]

    optimizer = build_optimizer(model, lr, 0.1, lr_multipliers=factors)
    assert describe_lr_multipliers(optimizer) == (
        f"lr multipliers: decay:mixer\\.[qkvo]_proj {len(attn['names'])} tensors lr 0.00099; "
        "no_decay:ssm_residual 1 tensors lr 0.03")
    assert describe_lr_multipliers(build_optimizer(model, lr, 0.1)) == "lr multipliers: no parameter matched"
    scheduler = build_scheduler(optimizer, 10, 110, 0.1)
    expected = {g["name"]: lr * {"decay:mixer\\.[qkvo]_proj": 0.33, "no_decay:ssm_residual": 10.0}.get(g["name"], 1.0)
                for g in optimizer.param_groups}
    for step in range(61):
        for g in optimizer.param_groups:
            assert g["lr"] == pytest.approx(expected[g["name"]] * lr_factor(step, 10, 110, 0.1), rel=1e-9), (step, g["name"])
        optimizer.step()
        scheduler.step()

    with pytest.raises(ValueError, match=r"q_proj.weight matches more than one pattern: proj, q_proj"):
        parameter_groups(model, 0.1, lr, {"proj": 1.0, "q_proj": 2.0})


def test_warmup_cosine_schedule():
    w, total, low = 10, 110, 0.1
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 60: 0.55, 35: low + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                110: 0.1, 500: 0.1}
    for step, value in expected.items():
        assert lr_factor(step, w, total, low) == pytest.approx(value, abs=1e-12), step
    assert lr_factor(0, 0, 10, 0.0) == 1.0
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, 2e-3, 0.0)
    scheduler = build_scheduler(optimizer, w, total, low)
    lrs = []
    for _ in range(61):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3) and lrs[60] == pytest.approx(1.1e-3)


def test_data_order_is_resumable():
    order = DataOrder(10, 3, seed=5)
    batches = [order.next() for _ in range(7)]  # 3 per epoch: crosses two epoch boundaries
    again = DataOrder(10, 3, seed=5, epoch=1, position=1)
    assert [again.next() for _ in range(3)] == batches[4:7]
    assert len(set(sum(batches[:3], []))) == 9  # one epoch: 9 distinct indices, the 10th dropped
    assert batches[:3] != batches[3:6]  # a fresh permutation per epoch


# ------------------------------------------------------------------ eval, generate


def test_eval_perplexity_and_recall(reference):
    trained = load_trained(reference.run_dir)
    assert trained.source.name == "final"
    _, eval_data = build_datasets(Recipe.from_dict(trained.recipe))
    result = evaluate(trained.model, eval_data, batch_size=4, max_batches=3, mqar=True)
    batch = eval_data[:12]
    with torch.no_grad():
        logits = trained.model(batch["input_ids"]).logits
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert result["tokens"] == int(mask.sum())
    assert result["loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)
    assert result["accuracy"] == pytest.approx(mqar_accuracy(logits, batch["labels"]))
    # the trainer's final eval (eval.batches = 2, batch 4) is the same computation
    final = evaluate(trained.model, eval_data, batch_size=4, max_batches=2, mqar=True)
    assert final["loss"] == pytest.approx(reference.final_eval["loss"], rel=1e-6)


def test_repack_joins_consecutive_blocks():
    ids = torch.arange(40).reshape(5, 8)
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    packed = repack(data, 2)
    assert packed["input_ids"].shape == (2, 16)
    assert torch.equal(packed["input_ids"].reshape(-1), torch.arange(32))
    assert repack(data, 8) is None


def test_text_length_generalisation_skips_short_data(reference):
    from types import SimpleNamespace

    from datasets import Dataset

    from bmojo_neuron.evaluation import format_length_table, length_generalisation

    ids = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    model = load_trained(reference.run_dir).model
    rows = length_generalisation(model, SimpleNamespace(data=SimpleNamespace(kind="text")), data, [1, 2, 4], 2)
    assert [(r.seq_len, r.sequences, r.skipped is None) for r in rows] == [(16, 3, True), (32, 1, True),
                                                                           (64, 0, False)]
    whole = evaluate(model, {"input_ids": ids[:2].reshape(1, 32), "labels": ids[:2].reshape(1, 32)}, 1)
    assert rows[1].loss == pytest.approx(whole["loss"], rel=1e-6)
    assert "skipped: only 3 eval blocks, need 4" in format_length_table(rows)


def test_bf16_activation_checkpointing_smoke(tmp_path):
    recipe = tiny_recipe(**{"train.precision": "bf16", "train.activation_checkpointing": True, "train.steps": 2,
                            "eval.batches": 1})
    result = train(recipe, tmp_path, progress=False)
    assert all(math.isfinite(r["loss"]) for r in result.metrics if r["type"] == "train")
    assert result.final_dir is not None and math.isfinite(result.final_eval["loss"])


def test_greedy_generate_equals_argmax_loop(reference):
    trained = load_trained(reference.run_dir / "step-0000006")  # a checkpoint dir works too
    prompt = "\x05\x09\x11\x02"  # byte ids 5, 9, 17, 2: inside this model's vocabulary of 32
    new, text = generate_text(trained, prompt, max_new_tokens=6, greedy=True)
    ids = torch.tensor([[5, 9, 17, 2]])
    expected = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(trained.model(ids).logits[0, -1].argmax())
            expected.append(nxt)
            if nxt == 0:  # the byte tokenizer's eos stops generation
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert new == expected
    assert text == bytes(expected).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- CLI


def test_cli_train_eval_generate(tmp_path, capsys):
    out = tmp_path / "runs"
    model = [f"model.{k}={v}" for k, v in TINY_MODEL.items() if k not in ("layer_pattern", "num_hidden_layers")]
    args = ["train", "cpu-tiny", *model, "model.num_hidden_layers=2", "model.layer_pattern=BB",
            "data.train_examples=32", "data.eval_examples=8", "train.steps=2", "train.batch_size=4",
            "train.log_every=1", "eval.every=1", "eval.batches=1", "eval.length_multipliers=[1,2]",
            "checkpoint.every=1", "checkpoint.keep_last=1", "optim.warmup_steps=1", "run.jobs=1",
            "--output-dir", str(out), "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "chance" in printed and "recall" in printed
    # the length evaluation is announced before it runs (tens of seconds on a CPU), then its table prints
    announced = printed.index("length generalisation: evaluating at 1x, 2x the training length\n")
    assert announced < printed.index("bmojo: length generalisation\n")
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 3  # cpu-tiny trains B'MOJO and its two baselines (`suite`)
    for run in runs:
        assert (run / "metrics.jsonl").is_file() and (run / "training.png").stat().st_size > 0
        assert (run / "length_eval.png").is_file()
        assert [p.name for p in layout.list_checkpoints(run)] == ["step-0000002"]  # keep_last=1
        assert (run / "final" / "config.json").is_file() and (run / "final" / "model.safetensors").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]
    summary = (out / "summary.txt").read_text()
    assert summary.count("\n") == 5 and "recall@2x" in summary and (out / "summary.png").stat().st_size > 0

    run = runs[0]
    assert cli.main(["eval", str(run), "--lengths", "1,2", "--batches", "1", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "recall" in table and (run / "eval" / "final" / "length_eval.png").is_file()
    rows = json.loads((run / "eval" / "final" / "length_eval.json").read_text())
    assert [r["seq_len"] for r in rows] == [64, 128]
    bmojo = out / "bmojo"
    assert cli.main(["inspect", str(bmojo), "--sequences", "2", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "memory after each chunk" in table and "values in memory" in table
    assert (bmojo / "eval" / "final" / "memory.png").stat().st_size > 0
    report = json.loads((bmojo / "eval" / "final" / "memory.json").read_text())
    assert [c["layer"] for c in report["coverage"]] == [0, 1] and report["coverage"][0]["queries"] > 0
    misses = report["coverage"][0]["misses_by_value_place"]
    assert misses.keys() == report["coverage"][0]["values"].keys()
    assert all(0 <= misses[p] <= n for p, n in report["coverage"][0]["values"].items())
    assert cli.main(["generate", str(run), "--prompt", "\x05\x06", "--max-new-tokens", "3", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("\x05\x06")
    assert cli.main(["generate", str(run), "--prompt", "x", "--temperature", "0"]) == 2  # clear error
    assert cli.main(args) == 2  # the same output dir again, without --resume: refused before any training
    assert "already holds a run" in capsys.readouterr().err


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_leave_one_core_free(monkeypatch, restore_threads):
    from bmojo_neuron import device

    assert [device.default_cpu_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    for name in device.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device, "usable_cores", lambda: 4)
    torch.set_num_threads(4)  # torch's own default: every core
    assert device.set_cpu_threads(0) == 3
    assert device.set_cpu_threads(None) == 3
    torch.set_num_threads(2)  # a caller that chose fewer keeps them
    assert device.set_cpu_threads(0) == 2
    assert device.set_cpu_threads(4) == 4  # an explicit count is used as given
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # torch applied it: left alone
    assert device.set_cpu_threads(0) == 4


def test_an_mqar_run_without_progress_never_imports_datasets(tmp_path, monkeypatch):
    """`datasets` is only for text data: an MQAR run under --no-progress turns the hub's bars off and leaves
    `datasets` unimported (its import is about a second of every quick-start run's start-up)."""
    import sys

    from huggingface_hub.utils import are_progress_bars_disabled

    import bmojo_neuron.training.trainer as trainer_module

    monkeypatch.setitem(sys.modules, "datasets", None)  # from here on, `import datasets` raises ImportError
    real, inside = trainer_module.library_progress_bars, []

    def recording(enabled, **kwargs):
        inside.append(enabled)
        return real(enabled, **kwargs)

    monkeypatch.setattr(trainer_module, "library_progress_bars", recording)
    monkeypatch.setattr(trainer_module.Trainer, "run", lambda self, *args: inside.append(are_progress_bars_disabled()))
    train(tiny_recipe(), tmp_path / "run", progress=False)
    assert inside == [False, True]  # bars off around the run, without importing datasets
    assert not are_progress_bars_disabled()  # and back on after it
