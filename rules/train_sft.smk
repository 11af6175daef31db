# Stage 6b, the SFT checkpoint: each model (the IVR model and the control) fine-tuned under
# `accelerate launch`. Resumable state lives in results/checkpoints/, which no rule declares, so a
# failed or killed job keeps it and the rerun resumes. On a cluster the training job's resources
# (runtime growing with the attempt) come from profiles/slurm/config.yaml; at its time limit Slurm sends
# SIGTERM to every process of the job, train_sft.py checkpoints the step it reached, and Snakemake's
# retry resumes from it. The shell and the launcher ignore that SIGTERM (`trap '' TERM`, inherited by
# accelerate's launcher): had they died at once, the job would end and Slurm would SIGKILL the training
# before its checkpoint is written; this way it has KillWait (30 s by default) to write it.
# With training.nodes > 1 the job gets that many nodes with training.gpus GPUs each (gres, per node) and
# the SLURM plugin's `mpi` resource, so that the plugin runs the shell once in the job instead of under
# `srun -n1`; scripts/accelerate_nodes.sh then starts one `accelerate launch` per node through srun.


rule train_sft:
    input:
        unpack(train_inputs),
    output:
        directory("results/model/{trained}"),
    log:
        "logs/train_sft/{trained}.log",
    benchmark:
        "benchmarks/train_sft/{trained}.tsv"
    conda:
        ENV
    threads: config["training"]["threads"]
    resources:
        **train_resources(),
    params:
        script=script("train_sft.py"),
        accelerate=accelerate_config(),
        launch=(
            "accelerate launch"
            if train_nodes() == 1
            else f"bash {shlex.quote(script('accelerate_nodes.sh'))}"
        ),
        processes=train_processes,
        nodes=train_nodes(),
        model=lambda wildcards: branch_model(trained_branch(wildcards)),
        data=lambda wildcards: f"results/data/{trained_branch(wildcards)}",
        extra=train_args,
        settings=branch_settings,
        checkpoints="results/checkpoints/{trained}",
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "trap '' TERM; {params.launch} --config_file {params.accelerate:q} --num_processes {params.processes}"
        " --num_machines {params.nodes} --num_cpu_threads_per_process {threads}"
        " {params.script:q} --model {params.model:q} --data {params.data:q} {params.extra}"
        " --settings {params.settings:q} --threads {threads}"
        " {params.trust} --checkpoint-dir {params.checkpoints:q} --out {output:q} > {log:q} 2>&1"
