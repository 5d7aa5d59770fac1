"""The one training loop, for K >= 1 trials (a single run is a list of one):

    run        run_trials(specs): the one way in; a run per trial, an outcome per trial
    trial      TrialSpec (config, run name, tags, resume, callback), a trial's state, early stopping
    loop       the epochs: steps, train/* and val/*, divergence, checkpoints, then the end
    steps      one optimizer step: plain autograd for one model, vmap for K (padded: K sizes)
    padding    trials of different sizes in one pass: held in the widest model, masked
    scoring    a split's loss/recon/KL/ELBO for K models; per-seed noise streams
    finalize   test/* done: eval/*, artifacts, the model, the run FINISHED
    checkpoints  a trial's whole state as an artifact of its run; where a killed trial resumes
    batching   batch_key (which trials can share a pass) and plan_batches
    device     the device, the seeds, bf16 policy
"""
