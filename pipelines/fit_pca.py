"""DVC stage `fit_pca`: when `pca.enabled`, fit PCA on patches of `pca.num_images` training
images and save it to `pca.out_path`; otherwise only say so (the stage's output directory
then holds a note instead of the file)."""
import sys

from jetformer.data.stages import run_fit_pca
from jetformer.stage import run_stage


def main(argv=None) -> int:
    return run_stage("fit_pca", run_fit_pca, __doc__, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
