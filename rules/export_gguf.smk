# results/final_model as GGUF files that llama.cpp and ollama run, checked in llama.cpp; made only when
# asked for by name: snakemake --cores all results/final_model.gguf


rule export_gguf:
    input:
        model="results/final_model",
        checks=heldout_texts(),
        base=(
            local_inputs(config["base_model"])
            if "base" in gguf_outputs().values()
            else []
        ),
    output:
        gguf=list(gguf_outputs()),
        report="results/report/gguf_check.json",
    log:
        "logs/export_gguf.log",
    benchmark:
        "benchmarks/export_gguf.tsv"
    conda:
        ENV
    threads: 2
    params:
        script=script("export_gguf.py"),
        args=export_args,
        documents=config["export"]["check_documents"],
    shell:
        "python {params.script:q} --model {input.model:q} {params.args}"
        " --check-documents {params.documents} --threads {threads}"
        " --report {output.report:q} > {log:q} 2>&1"
