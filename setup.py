"""LearnPruner for LLaVA: visual-token pruning toolkit (install with scripts/setup_env.sh)."""

from setuptools import find_packages, setup

# Pinned to versions verified on the CPU CI machine. torch must stay exactly 2.13.0: an unpinned
# torch (or a dependency asking for a newer one) pulls a multi-GB CUDA build.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface_hub==2.4.0",
    "sentencepiece==0.2.3",  # slow Llama tokenizer of original-format LLaVA checkpoints (tokenizer.model)
    "protobuf==7.36.2",  # read by transformers when it loads a sentencepiece model
    "numpy==2.4.6",
    "pillow==12.3.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

EXTRAS = {
    "train": ["deepspeed==0.19.8", "accelerate==1.15.0", "peft==0.21.2"],  # peft: LoRA for ATP training (train_atp)
    "demo": ["gradio==6.31.0", "gradio_client==2.7.2"],
    "eval": ["openpyxl==3.1.5"],  # MMBench submission .xlsx
    "video": ["av==18.1.0"],  # PyAV: video decoding (llava.video), Video-LLaVA inputs and the toy video clips
    "test": ["pytest==9.2.0", "playwright==1.65.2"],
    "gpu": ["flash-attn>=2.6"],
    # Ray-distributed sweeps (llava.eval.sweep --ray); ray's own requirements do not include torch
    "ray": ["ray==2.60.0"],  # GPU machines only; never installed by setup_env.sh on CPU
    # lmms-eval's runtime dependencies (checked for LMMS_EVAL below); lmms-eval itself is installed --no-deps by
    # scripts/setup_env.sh, because its own requirements pull a CUDA torch and torchvision
    "lmms": ["accelerate==1.15.0", "datasets==5.2.0", "evaluate==0.4.6", "loguru==0.7.3", "pytablewriter==1.2.1",
             "sacrebleu==2.6.0", "jsonlines==4.0.0", "tenacity==9.2.1", "numexpr==2.14.2", "pyyaml==6.0.4", "jinja2==3.1.6",
             "filelock==3.32.7"],  # lmms-eval 0.7.3 patches filelock._api (gone in 4.x)
}
LMMS_EVAL = "lmms-eval==0.7.3"  # read by scripts/setup_env.sh (EXTRAS=...,lmms)

setup(
    name="learnpruner-llava",
    version="0.1.0",
    description="Two-stage visual-token pruning (LearnPruner) and baselines for LLaVA-family VLMs",
    packages=find_packages(include=["llava", "llava.*", "learnpruner_ext", "learnpruner_ext.*", "toyworld", "toyworld.*"]),
    python_requires=">=3.10",
    # the demo's example scenes (llava.serve.examples reads them next to the module)
    package_data={"llava.serve": ["demo_examples/*.json", "demo_examples/*.png"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # lmms-eval >= 0.7 finds plugin models through this group (MODEL_REGISTRY_V2.load_entrypoint_manifests)
    entry_points={"lmms_eval.models": ["learnpruner_llava = llava.eval.lmms:manifest"]},
)
