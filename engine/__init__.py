"""simfed engine: one run of one experiment.

    plan.check_experiment   everything checked before any work, once -> a Plan
    loop.run_experiment     the rounds: train, evaluate (evaluate.evaluate), checkpoint, status
    backends.Backend        where the work runs: SerialBackend in-process, raybackend.RayBackend
                            on a pool of Ray actors; both drive server.Server and worker.Worker

Importing this package is cheap (no Ray, no torch); submodules pull what they need.
"""
