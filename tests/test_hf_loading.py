"""Loading B'MOJO the Hugging Face way: `import bmojo_neuron` registers ``bmojo``, exports load by name.

The registration is checked in fresh interpreters: it depends on the order in which
this package and transformers' Auto modules are imported, which one process can see
only once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from naive import tiny_config

from bmojo_neuron import BMojoForCausalLM
from bmojo_neuron.auto_map import AUTO_MAP, LOADER_FILE
from bmojo_neuron.checkpoints.export import export_final
from bmojo_neuron.data.tokenizer import ByteTokenizer, hf_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]

CHECK_REGISTERED = """
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
config = AutoConfig.for_model("bmojo", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, window_size=4, memory_size=0, ssm_head_dim=8,
                              ssm_state_size=8, intermediate_size=32)
assert type(config).__name__ == "BMojoConfig", type(config)
assert type(AutoModel.from_config(config)).__name__ == "BMojoModel"
assert type(AutoModelForCausalLM.from_config(config)).__name__ == "BMojoForCausalLM"
# the text-generation pipeline accepts a model whose class its causal-LM mapping lists
assert "BMojoForCausalLM" in [c.__name__ for c in MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.values()]
print("registered")
"""


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="error::UserWarning:bmojo_neuron.auto_registration")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("before", [
    # bmojo_neuron first, then a model module whose import runs modeling_auto half-way through modeling_layers
    "import bmojo_neuron, sys\n"
    "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import bmojo_neuron stays light'\n"
    "import transformers.models.mamba2.modeling_mamba2\n",
    # transformers' Auto classes first, then bmojo_neuron
    "from transformers import AutoModelForCausalLM\nimport bmojo_neuron\n",
], ids=["bmojo-first", "transformers-first"])
def test_import_bmojo_neuron_registers_the_auto_classes(before, tmp_path):
    result = run_python(before + CHECK_REGISTERED, tmp_path)
    assert result.returncode == 0 and "registered" in result.stdout, result.stderr[-3000:]


def test_export_loads_by_name_without_importing_bmojo_neuron(tmp_path):
    model = BMojoForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "export")
    config = (tmp_path / "export" / "config.json").read_text()
    assert all(f'"{ref}"' in config for ref in AUTO_MAP.values())
    assert (tmp_path / "export" / LOADER_FILE).is_file()
    code = """
        import sys
        import torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained("export")
        except ValueError as err:
            assert "trust_remote_code=True" in str(err)
        else:
            raise AssertionError("loaded custom code without trust_remote_code")
        model = AutoModelForCausalLM.from_pretrained("export", trust_remote_code=True)
        assert type(model).__module__ == "bmojo_neuron.modeling_bmojo", type(model)
        torch.save(model(torch.arange(10)[None] % 64).logits, "logits.pt")
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model.eval()(torch.arange(10)[None] % 64).logits
    # same weights; only the thread count differs (float32 summation order)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-6)


def test_loading_by_name_without_the_package_names_it(tmp_path):
    """docs/hf.md: without bmojo-neuron installed, transformers says which package the saved loader needs."""
    BMojoForCausalLM(tiny_config()).save_pretrained(tmp_path / "export")
    code = """
        import importlib.abc, sys

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "bmojo_neuron":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained("export", trust_remote_code=True)
        except ImportError as err:
            print(err)
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bmojo_neuron" in result.stdout and "pip install" in result.stdout, result.stdout


def test_hf_byte_tokenizer_gives_the_byte_tokenizer_ids():
    text = "plain ascii, héllo wörld, 中文, emoji 🙂, NUL \x00 and U+0100 \u0100 as text\n\t"
    ours, theirs = ByteTokenizer(), hf_byte_tokenizer()
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eos_token_id == 0 and len(theirs) == 256


def test_pipeline_loads_a_final_export_by_path(tmp_path):
    from transformers import pipeline

    torch.manual_seed(0)
    model = BMojoForCausalLM(tiny_config(vocab_size=256)).eval()
    final = export_final(tmp_path / "run", model, {"model": {}}, "byte", {})
    assert (final / "tokenizer.json").is_file()
    generator = pipeline("text-generation", model=str(final))
    text = generator("abc", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    with torch.no_grad():
        out = model.generate(torch.tensor([list(b"abc")]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    new = [t for t in out[0, 3:].tolist() if t != 0]  # the pipeline drops eos (byte 0) as a special token
    assert text == bytes(new).decode("utf-8", errors="replace")


@pytest.mark.parametrize("kind,eos", [("text", 0), ("mqar", None)])
def test_a_text_model_exports_the_tokenizers_end_of_text_as_its_eos(tmp_path, kind, eos):
    """A text model's export stops Hugging Face generation at the tokenizer's end-of-text id (byte 0 for the
    byte tokenizer); an MQAR model's tokens are task ids, not text, so it gets none."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = BMojoForCausalLM(tiny_config(vocab_size=256)).eval()
    final = export_final(tmp_path / "run", model, {"model": {}, "data": {"kind": kind}}, "byte", {})
    loaded = AutoModelForCausalLM.from_pretrained(str(final))
    assert loaded.config.eos_token_id == eos
    assert GenerationConfig.from_pretrained(str(final)).eos_token_id == eos
    assert loaded.generation_config.eos_token_id == eos
    assert loaded.generation_config.pad_token_id == eos


def test_a_model_smaller_than_its_tokenizer_exports_no_tokenizer_files(tmp_path):
    """An MQAR model (64 task ids, named after the byte tokenizer) gets no tokenizer files: with them,
    pipeline() would encode text into ids its embedding lacks and fail with an IndexError."""
    model = BMojoForCausalLM(tiny_config(vocab_size=64)).eval()
    final = export_final(tmp_path / "run", model, {"model": {}, "data": {"kind": "mqar"}}, "byte", {})
    assert (final / "model.safetensors").is_file()
    assert not (final / "tokenizer.json").exists() and not (final / "tokenizer_config.json").exists()
