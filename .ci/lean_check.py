"""Run in a fresh venv holding only `pip install d2v2` (torch, triton, numpy, safetensors): every public op and
model imports, runs its PyTorch reference, an encoder in d2v2's export format saves and loads back, and none of
the engine's packages came along."""

import importlib.util
import tempfile

import torch

import d2v2.kernels as kernels
import d2v2.models as models

for name in kernels.__all__:
    assert hasattr(kernels, name), name
extras = [m for m in ("yaml", "tqdm", "PIL", "soundfile", "tokenizers", "sklearn", "matplotlib") if importlib.util.find_spec(m)]
assert not extras, f"the lean install pulled in {extras}"

method = models.build_method("data2vec2", models.method_config("data2vec2", "image", "tiny", impl="torch"))
source = torch.randn(2, 3, 32, 32)
out = method({"source": source, "mask": method.modality.make_masks(2, source)})
out["loss"].backward()

# An encoder written in d2v2's own export format loads back with d2v2.models alone.
with tempfile.TemporaryDirectory() as folder:
    models.save_pretrained(method.encoder.state_dict(), "data2vec2", method.cfg, folder, "student")
    encoder = models.load_pretrained(folder)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(source), method.forward_features(source), atol=1e-5, rtol=0)
print(f"lean install: {len(kernels.__all__)} kernel exports, {len(models.__all__)} model exports, one step ran, export format loads")
