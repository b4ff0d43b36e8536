"""The pretrained networks that only a user can supply: what each file is and how to recognise it.

Each artefact names the file(s) users have, the checksum where one is published, the key layout
its loader expects and a download URL where one is known (`midms weights list` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One file a user may have for an artefact, and how to recognise it.

    `sha256` is a full published digest; `sha256_prefix` is the leading hex digits that the file's
    own name carries under the torch.hub / OpenMMLab convention `name-<sha256 prefix>.ext`.
    `marker_key` is a state-dict key every file of this layout has, checked after loading.
    """

    filename: str
    layout: str
    marker_key: str
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    origin: str = ""

    @property
    def checksum(self) -> str | None:
        """The digest (or digest prefix) to compare with, None when none is published."""
        return self.sha256 or self.sha256_prefix

    def matches(self, digest: str) -> bool:
        return self.checksum is not None and digest.startswith(self.checksum)


@dataclass(frozen=True)
class Artefact:
    name: str
    description: str
    used_by: str
    sources: tuple[Source, ...]

    @property
    def url(self) -> str | None:
        return next((source.url for source in self.sources if source.url), None)


_TORCHVISION = "https://download.pytorch.org/models/"
_LDM = "https://ommer-lab.com/files/latent-diffusion/"
_LPIPS = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"
_SWIN_S = (
    "https://download.openmmlab.com/mmsegmentation/v0.5/swin/"
    "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K/"
    "upernet_swin_small_patch4_window7_512x512_160k_ade20k_pretrain_224x224_1K_20210526_192015-ee2fff1c.pth"
)

REGISTRY: dict[str, Artefact] = {
    artefact.name: artefact
    for artefact in (
        Artefact(
            "vgg19",
            "VGG19 ImageNet features",
            "training losses, style metrics",
            (
                Source(
                    "vgg19-dcbb9e9d.pth",
                    "torchvision-vgg19",
                    "features.0.weight",
                    url=_TORCHVISION + "vgg19-dcbb9e9d.pth",
                    sha256_prefix="dcbb9e9d",
                    origin="torchvision",
                ),
                Source(
                    "vgg19_conv.pth", "cocosnet-vgg19", "conv1_1.weight", origin="CoCosNet models/"
                ),
            ),
        ),
        Artefact(
            "inception-fid",
            "Inception-v3 ported from TensorFlow's FID graph",
            "FID",
            (
                Source(
                    "pt_inception-2015-12-05-6726825d.pth",
                    "pytorch-fid-inception",
                    "Conv2d_1a_3x3.conv.weight",
                    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth",
                    sha256_prefix="6726825d",
                    origin="pytorch-fid",
                ),
            ),
        ),
        Artefact(
            "lpips-vgg",
            "LPIPS v0.1 linear heads on VGG16",
            "LPIPS diversity",
            (
                Source(
                    "vgg.pth",
                    "lpips-linear",
                    "lin0.model.1.weight",
                    url=_LPIPS + "vgg.pth",
                    origin="LPIPS v0.1",
                ),
            ),
        ),
        Artefact(
            "lpips-alex",
            "LPIPS v0.1 linear heads on AlexNet",
            "LPIPS diversity",
            (
                Source(
                    "alex.pth",
                    "lpips-linear",
                    "lin0.model.1.weight",
                    url=_LPIPS + "alex.pth",
                    origin="LPIPS v0.1",
                ),
            ),
        ),
        Artefact(
            "alexnet",
            "AlexNet ImageNet backbone of lpips-alex",
            "LPIPS diversity",
            (
                Source(
                    "alexnet-owt-7be5be79.pth",
                    "torchvision-alexnet",
                    "features.0.weight",
                    url=_TORCHVISION + "alexnet-owt-7be5be79.pth",
                    sha256_prefix="7be5be79",
                    origin="torchvision",
                ),
            ),
        ),
        Artefact(
            "vgg16",
            "VGG16 ImageNet backbone of lpips-vgg",
            "LPIPS (VGG variant)",
            (
                Source(
                    "vgg16-397923af.pth",
                    "torchvision-vgg16",
                    "features.0.weight",
                    url=_TORCHVISION + "vgg16-397923af.pth",
                    sha256_prefix="397923af",
                    origin="torchvision",
                ),
            ),
        ),
        Artefact(
            "openpose-body",
            "OpenPose body-25 COCO-18 keypoint network",
            "DeepFashion pose conditions",
            (
                Source(
                    "body_pose_model.pth",
                    "openpose-body",
                    "conv1_1.weight",
                    url="https://huggingface.co/lllyasviel/Annotators/resolve/main/body_pose_model.pth",
                    origin="pytorch-openpose",
                ),
            ),
        ),
        Artefact(
            "swin-s-ade20k",
            "UperNet Swin-S ADE20K segmenter",
            "LSUN segmentation conditions and loss",
            (
                Source(
                    _SWIN_S.rsplit("/", 1)[1],
                    "mmseg-upernet-swin",
                    "decode_head.conv_seg.weight",
                    url=_SWIN_S,
                    sha256_prefix="ee2fff1c",
                    origin="mmsegmentation v0.5",
                ),
            ),
        ),
        Artefact(
            "ldm-celeba256",
            "LDM CelebA-HQ 256 (VQ-f4 first stage + UNet)",
            "first stage + UNet",
            (
                Source(
                    "celeba.zip",
                    "ldm-latent-diffusion",
                    "model.diffusion_model.input_blocks.0.0.weight",
                    url=_LDM + "celeba.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
        Artefact(
            "ldm-lsun-churches",
            "LDM LSUN-Churches 256 (KL-f8 first stage + UNet)",
            "first stage + UNet",
            (
                Source(
                    "lsun_churches.zip",
                    "ldm-latent-diffusion",
                    "model.diffusion_model.input_blocks.0.0.weight",
                    url=_LDM + "lsun_churches.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
        Artefact(
            "vq-f4",
            "LDM VQ-f4 autoencoder (Z=8192, d=3)",
            "first stage pretraining",
            (
                Source(
                    "vq-f4.zip",
                    "ldm-vq",
                    "quantize.embedding.weight",
                    url=_LDM + "vq-f4.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
        Artefact(
            "kl-f8",
            "LDM KL-f8 autoencoder",
            "first stage pretraining",
            (
                Source(
                    "kl-f8.zip",
                    "ldm-kl",
                    "quant_conv.weight",
                    url=_LDM + "kl-f8.zip",
                    origin="CompVis latent-diffusion",
                ),
            ),
        ),
    )
}
