"""The save pipeline: prepare, write and commit (pipeline), reused host buffers (staging), encoding and
writing one rank's file (writer), background saves (async_save), the base of an incremental save
(incremental). May import everything below it: lifecycle, plan, format, storage, native, dist."""
