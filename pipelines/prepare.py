"""DVC stage `prepare@<role>` (roles: pretrain caption vqa zeroshot fid): (generate the shapes
world, then) read the role's source into its prepared directory with a role.json, and write
`metrics/prepare/<role>.json`."""
import sys

from jetformer.config import ROLES
from jetformer.data.classnames import ClassNameError
from jetformer.data.prepare import PrepareError
from jetformer.data.stages import run_prepare
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("prepare@{role}", run_prepare, __doc__, argv=argv,
                     positional={"role": ROLES}, errors=(PrepareError, ClassNameError),
                     metrics="metrics/prepare/{role}.json")


if __name__ == "__main__":
    sys.exit(main())
