package org.ptq4ris.demo

import android.graphics.Bitmap
import android.graphics.Color
import android.os.SystemClock
import java.io.File
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/**
 * Runs the programs `ptq4ris export-pte` writes: the text stage (ids → word features) and the visual stage (image +
 * word features → mask logits), timing each, as the device harness does. Inputs are those the host feeds: the image
 * resized to S×S (no crop), ImageNet-normalised CHW float32; ids and mask int64 [1, 20].
 */
class Segmenter(folder: File, private val tokenizer: WordPieceTokenizer, stem: String = "model") {
    private val text: Module
    private val visual: Module

    init {
        val textFile = File(folder, "$stem.text.pte")
        val visualFile = File(folder, "$stem.visual.pte")
        for (f in listOf(textFile, visualFile)) {
            require(f.isFile) { "${f.path} is missing: push the programs from `ptq4ris export-pte` there" }
        }
        text = Module.load(textFile.path)
        visual = Module.load(visualFile.path)
    }

    class Result(val mask: BooleanArray, val size: Int, val textMs: Double, val visualMs: Double)

    fun segment(photo: Bitmap, expression: String, size: Int): Result {
        val encoding = tokenizer.encode(expression)
        val shape = longArrayOf(1, tokenizer.maxTokens.toLong())
        val ids = Tensor.fromBlob(LongArray(encoding.inputIds.size) { encoding.inputIds[it].toLong() }, shape)
        val mask = Tensor.fromBlob(LongArray(encoding.attentionMask.size) { encoding.attentionMask[it].toLong() }, shape)
        val image = Tensor.fromBlob(pixels(photo, size), longArrayOf(1, 3, size.toLong(), size.toLong()))

        var start = SystemClock.elapsedRealtimeNanos()
        val features = text.forward(EValue.from(ids), EValue.from(mask))[0].toTensor()
        val textMs = (SystemClock.elapsedRealtimeNanos() - start) / 1e6
        start = SystemClock.elapsedRealtimeNanos()
        val logits = visual.forward(EValue.from(image), EValue.from(features), EValue.from(mask))[0].toTensor()
        val visualMs = (SystemClock.elapsedRealtimeNanos() - start) / 1e6

        val values = logits.dataAsFloatArray
        val plane = size * size
        return Result(BooleanArray(plane) { values[plane + it] > values[it] }, size, textMs, visualMs)
    }

    /** The photo resized to size×size (bilinear), CHW, ImageNet mean/std: what the host's preprocessing does. */
    private fun pixels(photo: Bitmap, size: Int): FloatArray {
        val scaled = Bitmap.createScaledBitmap(photo, size, size, true)
        val argb = IntArray(size * size)
        scaled.getPixels(argb, 0, size, 0, 0, size, size)
        val out = FloatArray(3 * size * size)
        for (i in argb.indices) {
            val p = argb[i]
            out[i] = (Color.red(p) / 255f - MEAN[0]) / STD[0]
            out[size * size + i] = (Color.green(p) / 255f - MEAN[1]) / STD[1]
            out[2 * size * size + i] = (Color.blue(p) / 255f - MEAN[2]) / STD[2]
        }
        return out
    }

    fun close() {
        text.destroy()
        visual.destroy()
    }

    companion object {
        private val MEAN = floatArrayOf(0.485f, 0.456f, 0.406f)
        private val STD = floatArrayOf(0.229f, 0.224f, 0.225f)

        /** The mask as a translucent red overlay, size×size (the ImageView scales it over the photo). */
        fun overlay(result: Result): Bitmap {
            val colors = IntArray(result.mask.size) { if (result.mask[it]) Color.argb(140, 255, 0, 0) else Color.TRANSPARENT }
            return Bitmap.createBitmap(colors, result.size, result.size, Bitmap.Config.ARGB_8888)
        }
    }
}
