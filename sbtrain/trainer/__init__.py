"""The training loop: a Trainer that owns the loop and checkpoints, a language-model train
step, callbacks for logging, and the pieces they use (optimizer, schedules, FLOP counting)."""
