"""The DeepSpeed continued-pretraining trainer (the only package that imports deepspeed).

    cli         launch/cpt.py and launch/export_hf.py
    loop        train(config, hooks): the steps, saves, stop signals and log lines
    plan        everything decided before the first step (rank 0 decides, all ranks follow)
    distributed process group for deepspeed / torchrun / srun / plain python, collective timeouts
    ds_config   DeepSpeed's JSON derived from the run config
    engine      model loading, optimizer groups, LR schedule, deepspeed.initialize
    checkpoint  marker-last saves, discovery, compatibility checks, universal conversion, retention, run-dir lock
    rng         RNG capture / restore          signals   SIGTERM / SIGUSR1 preemption
    metrics     train_log.jsonl, TensorBoard, progress, MFU          hooks   the seam for inline evaluation
    export      checkpoint -> Hugging Face model
    failpoints  named stall points for fault tests
"""
