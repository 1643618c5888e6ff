"""Integrations with the tools people train and watch runs with. One module each, importing its framework
only when imported itself (the core never imports these):

  shardckpt.integrations.lightning     ShardckptCheckpointIO, AsyncShardckptCheckpointIO (pytorch-lightning 2)
  shardckpt.integrations.lightning_sharded  ShardckptModelParallelStrategy (Lightning's FSDP2 / TP, every rank)
  shardckpt.integrations.tensorboard   TensorBoardCallback (CheckpointManager callbacks=)
  shardckpt.integrations.mlflow        MLflowCallback (CheckpointManager callbacks=)
  shardckpt.integrations.transformers  ShardckptTrainer, ShardckptTrainerMixin (Hugging Face Trainer)
  shardckpt.integrations.keras         ModelCheckpoint, BackupAndRestore (Keras 3, torch backend)
  shardckpt.integrations.wandb         WandbCallback (CheckpointManager callbacks=)

Install the framework with the matching extra: pip install "shardckpt[lightning]" / "[tensorboard]" /
"[mlflow]" / "[wandb]" / "[transformers]" / "[keras]".
"""
