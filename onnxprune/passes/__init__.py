"""Graph transformations, each a pass of one protocol (`protocol.py`: PassResult, PassRecord, and the
combinators Sequence, Guarded, FixedPoint):

* `apply_plan.ApplyPlan` — remove the units a plan names (slice, let each op's rule patch sizes);
* `depth.DropLayers` — reroute around whole residual layers or blocks;
* `lossless.BypassZeroBranches` — bypass all-zero residual branches (`find_dead_structure` runs it
  to a fixed point and finds the dead units for ApplyPlan);
* `reconstruct` — LeastSquaresRefit, BiasCompensation, BnRecalibration, OutputMatching, driven and
  guarded by held-out fidelity in `reconstruction.reconstruct`;
* `cleanup` — RemoveDeadNodes, DropUnusedInitializers, ReshareInitializers (`CLEANUP`).

Edits go through `onnxprune.ir.editor.GraphEditor`.
"""
