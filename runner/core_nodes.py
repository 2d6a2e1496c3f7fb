"""Class names of ComfyUI's built-in nodes, so the runner can tell "this needs the ComfyUI host" from a typo.

Collected from `nodes.py` and `comfy_extras/*.py` of Comfy-Org/ComfyUI 0.3.64
(a125cd84b054a57729b5eecab930ca9408719832); names only. Virtual frontend nodes (Reroute, PrimitiveNode,
Note, MarkdownNote) are handled by the UI converter and are not listed here.
"""
import difflib

COMFYUI_VERSION = "0.3.64"

CORE_NODES = frozenset((
    "APG", "AddNoise", "AlignYourStepsScheduler", "AudioAdjustVolume", "AudioConcat", "AudioEncoderEncode",
    "AudioEncoderLoader", "AudioMerge", "BasicGuider", "BasicScheduler", "BetaSamplingScheduler", "CFGGuider",
    "CFGNorm", "CFGZeroStar", "CLIPAttentionMultiply", "CLIPLoader", "CLIPMergeAdd", "CLIPMergeSimple",
    "CLIPMergeSubtract", "CLIPSave", "CLIPSetLastLayer", "CLIPTextEncode", "CLIPTextEncodeControlnet",
    "CLIPTextEncodeFlux", "CLIPTextEncodeHiDream", "CLIPTextEncodeHunyuanDiT", "CLIPTextEncodeLumina2",
    "CLIPTextEncodePixArtAlpha", "CLIPTextEncodeSD3", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner",
    "CLIPVisionEncode", "CLIPVisionLoader", "Canny", "CaseConverter", "CheckpointLoader",
    "CheckpointLoaderSimple", "CheckpointSave", "ChromaRadianceOptions", "ConditioningAverage",
    "ConditioningCombine", "ConditioningConcat", "ConditioningSetArea", "ConditioningSetAreaPercentage",
    "ConditioningSetAreaPercentageVideo", "ConditioningSetAreaStrength", "ConditioningSetMask",
    "ConditioningSetTimestepRange", "ConditioningStableAudio", "ConditioningZeroOut", "ContextWindowsManual",
    "ControlNetApply", "ControlNetApplyAdvanced", "ControlNetApplySD3", "ControlNetInpaintingAliMamaApply",
    "ControlNetLoader", "CosmosImageToVideoLatent", "CosmosPredict2ImageToVideoLatent", "CreateVideo",
    "CropMask", "DiffControlNetLoader", "DifferentialDiffusion", "DiffusersLoader", "DisableNoise",
    "DualCFGGuider", "DualCLIPLoader", "EasyCache", "EmptyAceStepLatentAudio", "EmptyAudio",
    "EmptyChromaRadianceLatentImage", "EmptyCosmosLatentVideo", "EmptyHunyuanImageLatent",
    "EmptyHunyuanLatentVideo", "EmptyImage", "EmptyLTXVLatentVideo", "EmptyLatentAudio",
    "EmptyLatentHunyuan3Dv2", "EmptyLatentImage", "EmptyMochiLatentVideo", "EmptySD3LatentImage", "Epsilon",
    "Scaling", "ExponentialScheduler", "ExtendIntermediateSigmas", "FeatherMask", "FlipSigmas",
    "FluxDisableGuidance", "FluxGuidance", "FluxKontextImageScale", "FluxKontextMultiReferenceLatentMethod",
    "FreSca", "FreeU", "FreeU_V2", "GITSScheduler", "GLIGENLoader", "GLIGENTextBoxApply", "GetImageSize",
    "GetVideoComponents", "GrowMask", "Hunyuan3Dv2Conditioning", "Hunyuan3Dv2ConditioningMultiView",
    "HunyuanImageToVideo", "HunyuanRefinerLatent", "HyperTile", "HypernetworkLoader", "ImageAddNoise",
    "ImageBatch", "ImageBlend", "ImageBlur", "ImageColorToMask", "ImageCompositeMasked", "ImageCrop",
    "ImageFlip", "ImageFromBatch", "ImageInvert", "ImageOnlyCheckpointLoader", "ImageOnlyCheckpointSave",
    "ImagePadForOutpaint", "ImageQuantize", "ImageRGBToYUV", "ImageRotate", "ImageScale", "ImageScaleBy",
    "ImageScaleToMaxDimension", "ImageScaleToTotalPixels", "ImageSharpen", "ImageStitch", "ImageToMask",
    "ImageUpscaleWithModel", "ImageYUVToRGB", "InpaintModelConditioning", "InstructPixToPixConditioning",
    "InvertMask", "JoinImageWithAlpha", "KSampler", "KSamplerAdvanced", "KSamplerSelect", "KarrasScheduler",
    "LTXVAddGuide", "LTXVConditioning", "LTXVCropGuides", "LTXVImgToVideo", "LTXVPreprocess", "LTXVScheduler",
    "LaplaceScheduler", "LatentAdd", "LatentApplyOperation", "LatentApplyOperationCFG", "LatentBatch",
    "LatentBatchSeedBehavior", "LatentBlend", "LatentComposite", "LatentCompositeMasked", "LatentConcat",
    "LatentCrop", "LatentCut", "LatentFlip", "LatentFromBatch", "LatentInterpolate", "LatentMultiply",
    "LatentOperationSharpen", "LatentOperationTonemapReinhard", "LatentRotate", "LatentSubtract",
    "LatentUpscale", "LatentUpscaleBy", "LazyCache", "Load3D", "Load3DAnimation", "LoadAudio", "LoadImage",
    "LoadImageMask", "LoadImageOutput", "LoadImageSetFromFolderNode", "LoadImageTextSetFromFolderNode",
    "LoadLatent", "LoadVideo", "LoraLoader", "LoraLoaderModelOnly", "LoraModelLoader", "LoraSave",
    "LossGraphNode", "LotusConditioning", "Mahiro", "MaskComposite", "MaskPreview", "MaskToImage",
    "ModelComputeDtype", "ModelMergeAdd", "ModelMergeAuraflow", "ModelMergeBlocks", "ModelMergeCosmos14B",
    "ModelMergeCosmos7B", "ModelMergeCosmosPredict2_14B", "ModelMergeCosmosPredict2_2B", "ModelMergeFlux1",
    "ModelMergeLTXV", "ModelMergeMochiPreview", "ModelMergeQwenImage", "ModelMergeSD1", "ModelMergeSD2",
    "ModelMergeSD35_Large", "ModelMergeSD3_2B", "ModelMergeSDXL", "ModelMergeSimple", "ModelMergeSubtract",
    "ModelMergeWAN2_1", "ModelPatchLoader", "ModelSamplingAuraFlow", "ModelSamplingContinuousEDM",
    "ModelSamplingContinuousV", "ModelSamplingDiscrete", "ModelSamplingFlux", "ModelSamplingLTXV",
    "ModelSamplingSD3", "ModelSamplingStableCascade", "ModelSave", "Morphology", "OptimalStepsScheduler",
    "PatchModelAddDownscale", "PerpNeg", "PerpNegGuider", "PerturbedAttentionGuidance", "PhotoMakerEncode",
    "PhotoMakerLoader", "PolyexponentialScheduler", "PorterDuffImageComposite", "Preview3D",
    "Preview3DAnimation", "PreviewAny", "PreviewAudio", "PreviewImage", "PrimitiveBoolean", "PrimitiveFloat",
    "PrimitiveInt", "PrimitiveString", "PrimitiveStringMultiline", "QuadrupleCLIPLoader",
    "QwenImageDiffsynthControlnet", "RandomNoise", "RebatchImages", "RebatchLatents", "RecordAudio",
    "ReferenceLatent", "RegexExtract", "RegexMatch", "RegexReplace", "RenormCFG", "RepeatImageBatch",
    "RepeatLatentBatch", "RescaleCFG", "ResizeAndPadImage", "SDTurboScheduler", "SD_4XUpscale_Conditioning",
    "SV3D_Conditioning", "SVD_img2vid_Conditioning", "SamplerCustom", "SamplerCustomAdvanced",
    "SamplerDPMAdaptative", "SamplerDPMPP_2M_SDE", "SamplerDPMPP_2S_Ancestral", "SamplerDPMPP_3M_SDE",
    "SamplerDPMPP_SDE", "SamplerER_SDE", "SamplerEulerAncestral", "SamplerEulerAncestralCFGPP",
    "SamplerEulerCFGpp", "SamplerLCMUpscale", "SamplerLMS", "SamplerSASolver", "SamplingPercentToSigma",
    "SaveAnimatedPNG", "SaveAnimatedWEBP", "SaveAudio", "SaveAudioMP3", "SaveAudioOpus", "SaveGLB",
    "SaveImage", "SaveLatent", "SaveLoRANode", "SaveSVGNode", "SaveVideo", "SaveWEBM",
    "SelfAttentionGuidance", "SetFirstSigma", "SetLatentNoiseMask", "SetUnionControlNetType",
    "SkipLayerGuidanceDiT", "SkipLayerGuidanceDiTSimple", "SkipLayerGuidanceSD3", "SolidMask",
    "SplitAudioChannels", "SplitImageWithAlpha", "SplitSigmas", "SplitSigmasDenoise",
    "StableCascade_EmptyLatentImage", "StableCascade_StageB_Conditioning", "StableCascade_StageC_VAEEncode",
    "StableCascade_SuperResolutionControlnet", "StableZero123_Conditioning",
    "StableZero123_Conditioning_Batched", "StringCompare", "StringConcatenate", "StringContains",
    "StringLength", "StringReplace", "StringSubstring", "StringTrim", "StyleModelApply", "StyleModelLoader",
    "T5TokenizerOptions", "TCFG", "TextEncodeAceStepAudio", "TextEncodeHunyuanVideo_ImageToVideo",
    "TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus", "ThresholdMask", "TomePatchModel",
    "TorchCompileModel", "TrainLoraNode", "TrimAudioDuration", "TrimVideoLatent", "TripleCLIPLoader",
    "UNETLoader", "UNetCrossAttentionMultiply", "UNetSelfAttentionMultiply", "UNetTemporalAttentionMultiply",
    "USOStyleReference", "UpscaleModelLoader", "VAEDecode", "VAEDecodeAudio", "VAEDecodeHunyuan3D",
    "VAEDecodeTiled", "VAEEncode", "VAEEncodeAudio", "VAEEncodeForInpaint", "VAEEncodeTiled", "VAELoader",
    "VAESave", "VPScheduler", "VideoLinearCFGGuidance", "VideoTriangleCFGGuidance", "VoxelToMesh",
    "VoxelToMeshBasic", "Wan22FunControlToVideo", "Wan22ImageToVideoLatent", "WanAnimateToVideo",
    "WanCameraEmbedding", "WanCameraImageToVideo", "WanContextWindowsManual", "WanFirstLastFrameToVideo",
    "WanFunControlToVideo", "WanFunInpaintToVideo", "WanHuMoImageToVideo", "WanImageToVideo",
    "WanPhantomSubjectToVideo", "WanSoundImageToVideo", "WanSoundImageToVideoExtend", "WanTrackToVideo",
    "WanVaceToVideo", "WebcamCapture", "unCLIPCheckpointLoader", "unCLIPConditioning",
))


# Core nodes outside the headless set whose job a TwinFlow node does (named in the refusal).
TWINFLOW_EQUIVALENTS = {
    "SamplerCustom": "TwinFlowSampler", "LoadVideo": "TwinFlowLoadVideo", "LoadLatent": "TwinFlowLoadLatent",
    "SaveLatent": "TwinFlowSaveLatent", "SaveWEBM": "TwinFlowSaveVideo", "EmptyMochiLatentVideo": "TwinFlowEmptyLatentVideo",
    "EmptyLatentImage": "TwinFlowEmptyLatentVideo (length 1)", "TorchCompileModel": "TwinFlowCompileModel",
    "CheckpointLoaderSimple": "TwinFlowLoadDiT + TwinFlowLoadVAE",
}


def is_core_node(class_type) -> bool:
    """Whether `class_type` is a node that ships with ComfyUI itself."""
    return isinstance(class_type, str) and class_type in CORE_NODES


def unknown_class_hint(class_type, known) -> str:
    """One sentence explaining why `class_type` is unknown here and what to do about it."""
    if is_core_node(class_type):
        twin = TWINFLOW_EQUIVALENTS.get(class_type)
        if twin:
            return (f"{class_type!r} is a ComfyUI core node that the headless runner does not execute; replace it "
                    f"with {twin}, which does the same job, or run this workflow inside ComfyUI.")
        return (f"{class_type!r} is a ComfyUI core node that the headless runner does not execute (it runs the core "
                f"Wan text/image-to-video set: `twinflow nodes` lists it); it needs the ComfyUI host, so run this "
                f"workflow inside ComfyUI.")
    close = difflib.get_close_matches(str(class_type), list(known), n=3, cutoff=0.6)
    if close:
        return f"unknown node class {class_type!r}; did you mean {', '.join(close)}?"
    return (f"unknown node class {class_type!r}: it is neither a TwinFlow node nor a ComfyUI core node "
            f"(a custom node from another pack?); list the available nodes with `twinflow nodes`.")
