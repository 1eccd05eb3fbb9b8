"""DVC stage `prepare`: (generate the shapes world, then) read the configured source, write
`data.prepared_dir` and the `metrics/prepare.json` metric."""
import sys

from jetformer.data.prepare import PrepareError
from jetformer.data.stages import run_prepare
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("prepare", run_prepare, __doc__, argv=argv, errors=(PrepareError,),
                     metrics="metrics/prepare.json")


if __name__ == "__main__":
    sys.exit(main())
