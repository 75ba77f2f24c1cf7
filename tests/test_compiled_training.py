"""Compiled training (``train.compile``, `layers.compiled_layers`) and the compiled bench candidates.

The numerics test compares eager with the layers compiled by ``aot_eager``: the whole
capture, functionalisation and the forward/backward split that inductor gets, run without
generating kernels (seconds). With ``BMOJO_TEST_INDUCTOR=1`` it also compiles them with
inductor (C++ kernels; about 3 minutes of compiling on 2 cores with a cold cache, so not by
default). The other tests capture graphs with the ``eager`` compile backend
(``BMOJO_COMPILE_BACKEND=eager``): the plumbing, whole-graph capture included.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil

import pytest
import torch

from bmojo_neuron import BMojoConfig, BMojoForCausalLM
from bmojo_neuron.cli import main
from bmojo_neuron.layers import compiled_layers
from bmojo_neuron.layers.compiled_layers import compile_layers
from bmojo_neuron.recipes import Recipe
from bmojo_neuron.training import train
from bmojo_neuron.training.backends import local

from test_training import TINY_RECIPE, train_losses

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, layer_pattern="BFMB", num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, window_size=16, fading_window=16, memory_size=4, memory_chunk=16,
              memory_picks=2, ssm_mixer="mamba2", ssm_state_size=8, ssm_head_dim=16, ssm_chunk_size=16,
              intermediate_size=64)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Drop every compiled graph after each test: their fake tensors must not outlive it (tests elsewhere
    walk the garbage collector's tensors), nor may graphs compiled here be reused by another test."""
    yield
    torch._dynamo.reset()
    gc.collect()


def loss_and_grads(model: BMojoForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


INDUCTOR = pytest.mark.skipif(
    not os.environ.get("BMOJO_TEST_INDUCTOR") or (shutil.which("c++") or shutil.which("g++")) is None,
    reason="set BMOJO_TEST_INDUCTOR=1 (needs a C++ compiler; minutes of compiling)")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR)])
def test_compiled_layers_equal_eager_loss_and_gradients(backend):
    """Compiled B, F and M layers give eager's loss and gradients within float32 round-off.

    Tolerance: rtol 1e-4, atol 1e-6 per element (measured with inductor: the loss is bitwise
    equal, gradients differ by < 3e-6 of their largest entry: fused kernels sum in another order).
    """
    torch.manual_seed(0)
    eager = BMojoForCausalLM(BMojoConfig(**CONFIG)).train()
    model = copy.deepcopy(eager)
    compiled = compile_layers(model, backend=backend)
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    want_loss, want = loss_and_grads(eager, ids)
    for _ in range(2):  # the first step compiles, the second reuses the graphs
        got_loss, got = loss_and_grads(model, ids)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.active
    assert model.state_dict().keys() == eager.state_dict().keys()  # checkpoints see the same names
    model.eval()
    with torch.no_grad():  # evaluation runs the eager layers: no compile for its shapes, same logits
        torch.testing.assert_close(model(ids[:, :20]).logits, eager.eval()(ids[:, :20]).logits, rtol=0, atol=0)


def tiny_recipe(**overrides) -> Recipe:
    base = {"train.steps": 2, "train.grad_accum": 1, "eval.every": 2, "checkpoint.every": 2, "eval.batches": 1}
    return Recipe.from_dict(TINY_RECIPE).with_overrides({**base, **overrides})


@pytest.fixture
def spy(monkeypatch):
    """Capture graphs without code generation, and record the `CompiledLayers` the trainer makes."""
    monkeypatch.setenv(compiled_layers.BACKEND_ENV, "eager")
    made = []

    def recording(model, backend=None):
        made.append(compile_layers(model, backend))
        return made[-1]

    monkeypatch.setattr(local, "compile_layers", recording)
    return made


def test_recipe_option_trains_through_the_compiled_layers(spy, tmp_path):
    eager = train(tiny_recipe(), tmp_path / "eager", progress=False)
    compiled = train(tiny_recipe(**{"train.compile": True}), tmp_path / "compiled", progress=False)
    assert len(spy) == 1 and spy[0].active and spy[0].compiled is not None
    for a, b in zip(train_losses(compiled.metrics), train_losses(eager.metrics), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert json.loads((tmp_path / "compiled" / "recipe.json").read_text())["train"]["compile"] is True


def test_a_failing_compiler_warns_and_trains_eagerly(spy, tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = train(tiny_recipe(), tmp_path / "eager", progress=False)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, training eagerly .*no C\\+\\+ compiler"):
        result = train(tiny_recipe(**{"train.compile": True}), tmp_path / "compiled", progress=False)
    assert not spy[0].active
    assert train_losses(result.metrics) == train_losses(eager.metrics)  # the failed step ran again, from scratch


def test_torch_compile_unavailable_warns_once(monkeypatch):
    monkeypatch.setattr(compiled_layers, "compile_unavailable", lambda: "torch.compile does not support this platform")
    model = BMojoForCausalLM(BMojoConfig(**CONFIG))
    with pytest.warns(RuntimeWarning, match="train.compile: torch.compile does not support this platform; training"):
        compiled = compile_layers(model)
    assert not compiled.active and "forward" not in model.model.layers[0].__dict__


@pytest.mark.parametrize("overrides, message", [
    ({"train.compile": "yes"}, "recipe key train.compile: must be true or false"),
    ({"train.compile": True, "train.activation_checkpointing": True},
     "recipe key train.compile: cannot be combined with train.activation_checkpointing"),
])
def test_bad_compile_settings_are_one_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(TINY_RECIPE).with_overrides(overrides)


def test_compile_refuses_parallel_and_neuron_runs(tmp_path):
    for device, parallel in (("neuron", {}), ("cpu", {"parallel.zero1": True})):
        recipe = tiny_recipe(**{"train.compile": True, "run.device": device, **parallel})
        with pytest.raises(ValueError, match="train.compile: torch.compile runs one-process cpu or cuda training"):
            train(recipe, tmp_path / device, progress=False)


def test_bench_compiled_candidates_report_compile_time_and_ratios(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled_layers.BACKEND_ENV, "eager")
    out = tmp_path / "t.json"
    args = ["bench", "train-step", "--toy", "--repeats", "1", "--warmup", "0", "--lengths", "32", "--no-probe",
            "--quiet", "--candidates", "bmojo,bmojo-compiled,hf-mistral-swa,hf-mistral-swa-compiled",
            "--json", str(out), "--plot", str(tmp_path / "t.png")]
    assert main(args) == 0
    report = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in report["results"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for name in ("bmojo-compiled", "hf-mistral-swa-compiled"):
        assert rows[name]["compile_s"] > 0
    described = {c["name"]: c for c in report["candidates"]}
    assert described["bmojo-compiled"]["compiled"] and not described["bmojo"]["compiled"]
    assert described["bmojo-compiled"]["params"] == described["bmojo"]["params"]  # the same model, compiled
    assert described["hf-mistral-swa-compiled"]["role"] == "baseline"
    ratios = {(r["candidate"], r["other"]): r for r in report["ratios"]}
    assert set(ratios) == {("bmojo-compiled", "hf-mistral-swa"), ("bmojo-compiled", "hf-mistral-swa-compiled"),
                           ("bmojo-compiled", "bmojo")}
    for (ours, other), r in ratios.items():
        assert r["value"] == pytest.approx(rows[ours]["tokens_per_s"] / rows[other]["tokens_per_s"], rel=1e-3)
    names = {t["name"] for t in report["targets"]}
    assert names == {"train-step L=32: B'MOJO tokens/s / hf-mistral-swa tokens/s"}  # targets stay on eager bmojo


def test_compiled_candidates_are_train_step_only(tmp_path, capsys):
    assert main(["bench", "decode", "--toy", "--candidates", "bmojo-compiled", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown candidate(s) ['bmojo-compiled']" in capsys.readouterr().err
