"""Typed configuration of a run: model, data, training loop and method (UEGR and its ablations).

Every field carries its constraints in `metadata` (choices, bounds); `uegr_dist.config.loading` checks them when the
config is built, so a wrong value fails at start-up with the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from uegr_dist.config.registry import METHOD_NAMES


def choice(default: str, *options: str, doc: str = "") -> Any:
    """A string field restricted to `options`."""
    return field(default=default, metadata={"choices": options, "doc": doc})


def bounded(
    default: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    doc: str = "",
) -> Any:
    """A numeric field restricted to an interval (open or closed ends)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc})


@dataclass
class ModelConfig:
    """Which network to fine-tune and how to build it."""

    name_or_path: str = "roberta-base"
    """Hub id, local folder, or `package:<python package>/<folder>` for weights shipped inside a pip package."""
    init: str = choice("pretrained", "pretrained", "random", doc="random: build from `architecture` + `config`")
    architecture: str | None = None
    """transformers model_type for init=random (bert, roberta, deberta-v2, ...)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides of the transformers config (e.g. hidden_size for a tiny random model)."""
    tokenizer: str | None = None
    """Tokenizer path or Hub id (default: name_or_path); `word_level` builds one from the training texts."""
    attn_implementation: str | None = choice(None, "eager", "sdpa", doc="None = the model's default")  # type: ignore[arg-type]
    trust_remote_code: bool = False
    """Run Python code shipped with a Hub model; off unless you trust its source."""


@dataclass
class DataConfig:
    """A registered task (`task`) or local training / validation files and their columns."""

    task: str | None = None
    """A registered task (GLUE, AdvGLUE, ANLI, IMDB, AG News, PAWS, HANS: `uegr-train --list-tasks`), loaded from the
    Hub, or from `task_path` when set. The column, label and regression options below apply to files only."""
    task_path: str | None = None
    """A local copy of the task: a `DatasetDict.save_to_disk` folder or a folder of the Hub repository's data files
    (any task); the GLUE download's task folder (`glue_data/SST-2` with train.tsv, dev.tsv; MNLI dev_matched.tsv,
    dev_mismatched.tsv) or the folder holding it (GLUE tasks); AdvGLUE's dev.json or a folder holding it (adv_*
    tasks). Layouts and label mapping: uegr_dist/data/layouts.py."""
    train_file: str | None = None
    validation_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = None
    """Fixed label order for a file (ids 0..n-1); labels may be these names or their ids. Default: integer labels
    keep their value, string labels are sorted."""
    num_labels: int | None = bounded(None, 1)
    """Number of classes for integer labels (default: the largest training label + 1); larger labels are refused."""
    regression: bool = False
    max_length: int = bounded(128, 8, 4096)
    truncation: str = choice(
        "longest_first", "longest_first", "only_first", "only_second", doc="how a too-long text pair is cut"
    )
    group_by_length: bool = False
    """Batch rows of similar length together (less padding, more throughput); batches are still shuffled."""
    padding: str = choice("longest", "longest", "max_length", doc="max_length: every batch has the same width")
    """`max_length` makes keyed dropout masks independent of which samples share a batch (needed for a
    multi-process run to reproduce a one-process run on data of varying length)."""
    validation_ratio: float = bounded(0.1, 0.0, 0.9, lo_open=True)
    max_train_samples: int | None = bounded(None, 1)
    """Train on a random slice of this many training rows (None: all). Drawn after the validation split is fixed
    (validation file or split, or the held-out `validation_ratio`), so validation is the same with and without it.
    The slice depends on `max_train_samples_seed` and the data, not on `train.seed`: every seed and method of a study
    trains on the same rows, and a smaller slice is a subset of a larger one. (Only with a held-out validation, which
    `train.seed` draws, do the slices of two seeds differ in the rows one of them holds out.)"""
    max_train_samples_seed: int = bounded(0, 0, 2**32 - 1)
    """Seed of the `max_train_samples` slice (change it to measure the variance across slices)."""
    max_eval_samples: int | None = bounded(None, 1)
    """Evaluate on the first this many rows of each validation split (None: all)."""


@dataclass
class AverageConfig:
    """Weight averaging for any method (uegr_dist/engine/averaging.py): SWA (Izmailov et al., 2018; for fine-tuning
    pre-trained language models, Lu et al., Findings of EMNLP 2022) or an exponential moving average of the weights.
    Averaging starts after optimizer step S (`start`) and takes the weights after steps S + every, S + 2 every, ...;
    the EMA starts from the weights after step S. Evaluation and the saved model use the average."""

    kind: str = choice("none", "none", "swa", "ema", doc="none: no averaging")
    start: float = bounded(0.75, 0.0)
    """S: below 1 a fraction of the run's optimizer steps (rounded), from 1 on a step number (a whole number)."""
    every: int = bounded(1, 1)
    """Steps between the weights averaged (SWA with lr_schedule cyclic: the cycle length)."""
    lr_schedule: str = choice("constant", "keep", "constant", "cyclic", doc="SWA's learning rate after step S")
    """SWA only. keep: the run's own schedule; constant: swa_lr; cyclic: in each cycle of `every` steps the rate falls
    linearly from swa_lr to swa_lr_min, and the weights are taken at the end of the cycle (at swa_lr_min)."""
    swa_lr: float | None = bounded(None, 0.0, lo_open=True)
    """SWA's learning rate after step S (constant) or at the top of each cycle (cyclic); None: train.lr."""
    swa_lr_min: float | None = bounded(None, 0.0)
    """The low end of a cycle (cyclic); None: swa_lr / 10."""
    ema_decay: float = bounded(0.999, 0.0, 1.0, hi_open=True)
    """EMA: average <- ema_decay * average + (1 - ema_decay) * weights."""
    keep_raw: bool = False
    """Also save the raw (not averaged) weights of the last step, into output_dir/raw."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    output_dir: str = "outputs/run"
    seed: int = 42
    epochs: float = bounded(3.0, 0.0, lo_open=True)
    max_steps: int | None = bounded(None, 1)
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = bounded(32, 1)
    """Per-process micro-batch size."""
    eval_batch_size: int = bounded(64, 1)
    grad_accum: int = bounded(1, 1)
    lr: float = bounded(2e-5, 0.0, lo_open=True)
    weight_decay: float = bounded(0.01, 0.0)
    warmup_ratio: float = bounded(0.06, 0.0, 1.0)
    lr_schedule: str = choice("linear", "linear", "constant", "cosine")
    max_grad_norm: float = bounded(1.0, 0.0)
    """0 disables clipping. Clipping sees the masked gradient."""
    mixed_precision: str = choice("no", "no", "bf16", "fp16")
    eval_every_epoch: bool = True
    log_every: int = bounded(10, 1)
    tracker: str = choice("tensorboard", "tensorboard", "none")
    progress: bool = True
    save_model: bool = True
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a finished run."""
    save_every: int = bounded(500, 0)
    """Optimizer steps between checkpoints (output_dir/checkpoints/step-N); one is also written at the end and on
    preemption. 0: no checkpoints except on preemption."""
    keep_last: int = bounded(2, 1)
    """Complete checkpoints kept (older ones are deleted after a newer one is complete)."""
    resume: str = "none"
    """none: start fresh; auto: continue from the newest complete checkpoint in output_dir (fresh if there is none);
    or the path of one checkpoint directory."""
    max_nonfinite_steps: int = bounded(10, 1)
    """Stop after this many consecutive optimizer steps with a non-finite loss or gradient (each one is skipped)."""
    collective_timeout: int = bounded(600, 10)
    """Seconds a collective may wait for a peer before the job fails (a crashed rank must not hang the others)."""
    push_to_hub: str | None = None
    """Hub repository id (user/name): upload the saved model, tokenizer and model card there at the end of the run
    (needs network access and a token: `hf auth login`). A failed upload loses nothing: the run's files stay."""
    average: AverageConfig = field(default_factory=AverageConfig)
    """Weight averaging (SWA or EMA, any method): evaluation and the saved model use the averaged weights."""


@dataclass
class DropoutConfig:
    """The K adaptive-dropout sub-models (docs/design.md §1.2)."""

    k: int = bounded(2, 1, 8)
    p_min: float = bounded(0.05, 0.0, 0.95)
    p_max: float = bounded(0.3, 0.0, 0.95)
    schedule: str = choice("redraw", "fixed", "redraw", "adaptive")
    target_js: float = bounded(0.05, 0.0)
    gain: float = bounded(0.5, 0.0)


@dataclass
class AdversaryConfig:
    """Embedding-space adversary (docs/design.md §1.1)."""

    steps: int = bounded(1, 0, 20)
    eps: float = bounded(0.1, 0.0)
    step_size: float = bounded(0.1, 0.0)
    norm: str = choice("l2", "l2", "linf")
    init_scale: float = bounded(0.01, 0.0)
    relative: bool = False
    """false: eps, step_size and init_scale are absolute, in embedding units; true: fractions of each example's own
    embedding size (l2: of the L2 norm of its token embeddings; linf and init_scale: of their root mean square
    coordinate), the same share of the text for every length and model (uegr_dist/forward/adversary.py)."""


@dataclass
class MaskConfig:
    """Saliency scores and the top-rho gradient mask (docs/design.md §1.4-1.5). Every field but `enabled` is a
    `MaskOptions` field of the same name (`MaskOptions.from_config`)."""

    enabled: bool = True
    ratio: float = bounded(0.3, 0.0, 1.0, lo_open=True)
    scope: str = choice("global", "global", "per_layer", "per_tensor")
    kind: str = choice("hard", "hard", "soft")
    saliency: str = choice("taylor", "taylor", "grad_sq", "fisher_ema")
    ema_beta: float = bounded(0.9, 0.0, 1.0, hi_open=True)
    soft_temperature: float = bounded(10.0, 0.0, lo_open=True)
    exclude: list[str] = field(default_factory=list)
    """Regexes on parameter names that are always updated (e.g. `classifier`)."""


@dataclass
class RDropConfig:
    """R-Drop (Liang et al., 2021): two dropout passes and their symmetric KL."""

    alpha: float = bounded(1.0, 0.0, doc="weight of 0.5 * (KL(p1||p2) + KL(p2||p1)); the paper searches 0.1-1.0")


@dataclass
class FreeLBConfig:
    """FreeLB (Zhu et al., 2020): K ascent steps on an embedding perturbation, parameter gradients averaged."""

    steps: int = bounded(3, 1, 20, doc="K ascent steps (= forward passes) per micro-batch")
    adv_lr: float = bounded(0.1, 0.0, lo_open=True, doc="ascent step size on the normalized delta gradient")
    init_mag: float = bounded(0.6, 0.0, doc="delta_0 magnitude (l2: / sqrt(tokens * dim); linf: the bound itself)")
    max_norm: float = bounded(0.0, 0.0, doc="projection radius of delta per example; 0 = no projection")
    norm: str = choice("l2", "l2", "linf")


@dataclass
class SMARTConfig:
    """SMART (Jiang et al., 2020): smoothness-inducing adversarial regularizer, optional Bregman proximal term."""

    weight: float = bounded(1.0, 0.0, doc="lambda_s, weight of the symmetric-KL smoothness term (paper: 1, 3, 5)")
    noise_std: float = bounded(1e-5, 0.0, doc="sigma of the Gaussian start delta_0")
    step_size: float = bounded(1e-3, 0.0, doc="eta of the ascent step along g / (max|g| + norm_eps)")
    steps: int = bounded(1, 0, 10, doc="ascent steps on delta (0: the random start only)")
    norm_eps: float = bounded(1e-6, 0.0, lo_open=True)
    bregman_mu: float = bounded(0.0, 0.0, doc="weight of the Bregman proximal term to an EMA teacher; 0 = off")
    ema_beta: float = bounded(0.99, 0.0, 1.0, hi_open=True, doc="EMA decay of the teacher parameters")


@dataclass
class HyPeConfig:
    """HyPe (Yuan et al., 2023): noise on the hidden states entering each transformer layer, training only."""

    noise: str = choice("normal", "normal", "uniform", doc="normal: N(0, scale^2); uniform: U(-scale, scale)")
    scale: float = bounded(1e-5, 0.0, lo_open=True)


@dataclass
class ASAConfig:
    """ASA (Wu & Zhao, 2023): adversarial self-attention masks through gradient reversal, with a budget."""

    tau: float = bounded(0.5, 0.0, doc="budget weight tau^2 on the mean number of masked attention units per query")


@dataclass
class ChildTuningConfig:
    """ChildTuning-D / -F (Xu et al., EMNLP 2021): which gradient coordinates of the encoder layers are updated."""

    reserve_p: float = bounded(0.2, 0.0, 1.0, lo_open=True)
    """ChildTuning-D: fraction of encoder-layer coordinates kept (top Fisher information, fixed for the run)."""
    p_f: float = bounded(0.2, 0.0, 1.0, lo_open=True)
    """ChildTuning-F: keep probability of each coordinate per step; kept gradients are scaled by 1 / p_f."""
    fisher_batch_size: int = bounded(16, 1)
    """ChildTuning-D / RoAST: batch size of the Fisher pre-pass (same on every process count, so results agree)."""
    include: str = r"(?:^|\.)layers?\.\d+\."
    """Regex (re.search on the parameter name) of the masked parameters: the encoder layers by default; the
    others (embeddings, pooler, classifier) are always updated."""


@dataclass
class RoastConfig:
    """RoAST's selective training (Kim et al., EMNLP Findings 2023): a Bernoulli mask from Fisher ranks."""

    alpha: float = bounded(0.9, 0.0, 1.0)
    """Relative rank at which the keep probability is 1/2."""
    beta: float = bounded(10.0, 0.0, lo_open=True)
    """Sharpness: p = sigmoid(2 * beta * (r - alpha))."""
    scale: bool = False
    """Divide kept gradients by p (unbiased in expectation, but a rarely kept coordinate gets up to 1 / p ~ 1e8)."""
    redraw: str = choice("step", "step", "epoch", doc="when the Bernoulli mask is redrawn (p changes each epoch)")
    include: str = r"(?:^|\.)layers?\.\d+\."
    """Regex of the masked parameters (the encoder layers by default); the others are always updated."""


@dataclass
class SamConfig:
    """SAM (Foret et al., ICLR 2021) with the m-sharpness and ASAM options."""

    rho: float = bounded(0.05, 0.0, lo_open=True)
    """Radius of the ascent step eps = rho * g / ||g||."""
    adaptive: bool = False
    """ASAM (Kwon et al., ICML 2021): eps = rho * T^2 g / ||T g||, T = |w| + asam_eta on weight tensors."""
    asam_eta: float = bounded(0.01, 0.0)
    m_shards: int = bounded(1, 1, 64)
    """mSAM: one eps per shard of each process's micro-batch (1: plain SAM on the globally averaged gradient)."""


@dataclass
class DeltaSamConfig:
    """Delta-SAM (Zhou et al., Findings of EMNLP 2022): SAM whose perturbation comes from a reweighted batch gradient,
    the weights a softmax over the global batch of each example's hardness."""

    rho: float = bounded(0.05, 0.0, lo_open=True)
    """Radius of the ascent step eps = rho * g_w / ||g_w||."""
    temperature: float = bounded(1.0, 0.0, lo_open=True)
    """tau of the weights softmax(score / tau) (large: uniform weights, plain SAM)."""
    score: str = choice("grad_norm", "grad_norm", "loss", doc="an example's hardness")
    """grad_norm: the norm of the example's loss gradient with respect to its logits; loss: the example's loss."""


@dataclass
class FisherSamConfig:
    """Fisher SAM (Kim et al., ICML 2022): the neighbourhood is the ellipsoid of a diagonal empirical Fisher."""

    rho: float = bounded(0.1, 0.0, lo_open=True)
    """Radius of the Fisher ellipsoid eps^T F eps <= rho^2."""
    eta: float = bounded(1.0, 0.0)
    """F = 1 + eta * g^2 (g the global batch gradient); 0 gives SAM."""


@dataclass
class AWPConfig:
    """AWP (Wu et al., NeurIPS 2020): a layer-wise relative adversarial weight perturbation around an objective."""

    objective: str = choice("vanilla", "vanilla", "uegr", "freelb", doc="the loss perturbed (its own options apply)")
    """vanilla: AWP alone; uegr, freelb: AWP with that method's input-space adversary (method.* / method.freelb.*)."""
    gamma: float = bounded(5e-3, 0.0, lo_open=True)
    """Relative size: ||v_l|| <= gamma * ||w_l|| for every weight tensor w_l."""
    steps: int = bounded(1, 1, 10)
    """Ascent steps on v (each a forward-backward pass)."""


@dataclass
class MatConfig:
    """MAT (Zhong et al., IJCAI 2023): SGLD sampling of embedding perturbations and parameters. The defaults are
    cheap (tests, CPU); the paper's are k_theta / k_delta = 20 / 3 or 30 / 5."""

    k_delta: int = bounded(1, 1, 100)
    """SGLD ascent steps on the perturbation per batch."""
    k_theta: int = bounded(2, 1, 100)
    """SGLD descent steps on the parameters per batch."""
    eta_delta: float = bounded(1e-3, 0.0, lo_open=True)
    eta_theta: float = bounded(3e-5, 0.0, lo_open=True)
    sigma_delta: float = bounded(1e-5, 0.0)
    """Langevin noise scale of the perturbation steps (0: plain gradient ascent)."""
    sigma_theta: float = bounded(0.0, 0.0)
    """Langevin noise scale of the parameter steps (0: plain gradient descent)."""
    init_std: float = bounded(1e-5, 0.0, lo_open=True)
    """Standard deviation of the initial perturbation (the KL term has zero gradient at delta = 0)."""
    lambda_s: float = bounded(1.0, 0.0)
    """Weight of the symmetric-KL smoothness term."""
    beta: float = bounded(0.3, 0.0, 1.0, hi_open=True)
    """EMA factor of delta_bar and theta_bar; final theta = beta theta_0 + (1 - beta) theta_bar."""


@dataclass
class MethodConfig:
    """The fine-tuning method and its hyper-parameters."""

    name: str = choice("uegr", *METHOD_NAMES, doc="a method of uegr_dist/config/registry.py")
    alpha: float = bounded(1.0, 0.0)
    """Weight of the adversarial cross-entropy of the sub-models."""
    beta: float = bounded(1.0, 0.0)
    """Weight of the JS consistency term (variance for regression)."""
    rng: str = choice(
        "fast",
        "fast",
        "keyed",
        doc="keyed: dropout/adversary noise keyed by sample id (reproducible across process counts)",
    )
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    rdrop: RDropConfig = field(default_factory=RDropConfig)
    freelb: FreeLBConfig = field(default_factory=FreeLBConfig)
    smart: SMARTConfig = field(default_factory=SMARTConfig)
    hype: HyPeConfig = field(default_factory=HyPeConfig)
    asa: ASAConfig = field(default_factory=ASAConfig)
    childtuning: ChildTuningConfig = field(default_factory=ChildTuningConfig)
    roast: RoastConfig = field(default_factory=RoastConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    mat: MatConfig = field(default_factory=MatConfig)
    delta_sam: DeltaSamConfig = field(default_factory=DeltaSamConfig)
    fisher_sam: FisherSamConfig = field(default_factory=FisherSamConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
