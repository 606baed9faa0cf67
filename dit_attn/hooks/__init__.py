"""Every interception of diffusers in one package: hooks on the transformer and its blocks
(`calls`), the wrappers on the pipeline's scheduler step and `check_inputs` (`pipeline`), the
call-selection rule (`selection`), the denoising-step reader (`steps`) and the diffusers
internals that have no public mechanism (`private`)."""
