import pytest
from safetensors.torch import load_file

from dstune.errors import InputError
from dstune.models.loading import embedded_gguf_path, resolve_model_path


def test_embedded_default_is_found_without_importing_its_package():
    path = embedded_gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_hf_directory_resolves_to_itself(tiny_model_dirs):
    assert resolve_model_path(str(tiny_model_dirs["qwen2"])) == tiny_model_dirs["qwen2"]


def test_pickle_only_model_dir_is_refused(tmp_path, tiny_model_dirs):
    import shutil

    target = tmp_path / "pickled"
    shutil.copytree(tiny_model_dirs["llama"], target)
    weights = target / "model.safetensors"
    assert load_file(weights)
    weights.rename(target / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle weight file refused.*dstune convert-weights.*--allow-pickle"):
        resolve_model_path(str(target))


@pytest.mark.parametrize("spec, message", [
    ("no-such-model", "neither a local directory"),
    ("/nope/model.gguf", "GGUF file not found"),
])
def test_bad_model_names_are_input_errors(spec, message):
    with pytest.raises(InputError, match=message):
        resolve_model_path(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_model_path(str(tmp_path))
