"""Side-by-side benchmarks of cdc-serve (issue 7), run with ``make bench``.

``python -m benchmarks.run --out docs/BENCHMARKS.md`` measures

1. inference throughput of the exported model: PyTorch eager, onnxruntime in-process,
   Triton over HTTP and gRPC (:mod:`benchmarks.inference`);
2. the per-batch mini-cluster K-means: the project's torch K-means against
   scikit-learn's (:mod:`benchmarks.kmeans_bench`);
3. CDC training throughput: batched tensor augmentation against a per-image PIL +
   DataLoader pipeline like the reference one (:mod:`benchmarks.training_bench`);

and writes the tables between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in the
output Markdown file (text outside the markers is kept). Every goal is a ratio of two
contenders measured in alternating rounds of the same run, so that it holds on a noisy
machine.
"""
