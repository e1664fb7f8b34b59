"""Decides whether another iteration runs: sets the `continue` global to false once the
`accuracy` global (float in [0, 1]) reaches the `target_accuracy` global."""

import tessera


class Scheduler(tessera.Task):
    def run(self):
        accuracy = self.world.globals.get("accuracy")
        target = self.world.globals.get("target_accuracy")
        iteration = self.config.get("swarm", {}).get("iteration")
        if accuracy is not None and target is not None and accuracy >= target:
            self.log.info("iteration %s: accuracy %.4f reached the target %.4f; stopping"
                          % (iteration, accuracy, target))
            self.world.globals["continue"] = False
        else:
            self.log.info("iteration %s: accuracy %s, target %s; going on" % (iteration, accuracy, target))
