package org.ptq4ris.demo

import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.TextView
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import java.io.File
import java.util.concurrent.Executors

/**
 * Pick a photo, type an expression, see the mask and each stage's latency. The programs and the vocabulary are read
 * from the app's external files folder; push them with
 *   adb push model.text.pte model.visual.pte vocab.txt /sdcard/Android/data/org.ptq4ris.demo/files/
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var segmenter: Segmenter? = null
    private var photo: Bitmap? = null

    private val picker = registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri: Uri? ->
        if (uri != null) {
            val bitmap = ImageDecoder.decodeBitmap(ImageDecoder.createSource(contentResolver, uri)) { decoder, _, _ ->
                decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE  // getPixels needs a software bitmap
            }
            photo = bitmap
            findViewById<ImageView>(R.id.photo).setImageBitmap(bitmap)
            findViewById<ImageView>(R.id.mask).setImageDrawable(null)
        }
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        val status = findViewById<TextView>(R.id.status)
        val folder = getExternalFilesDir(null) ?: filesDir
        try {
            val vocab = File(folder, "vocab.txt")
            require(vocab.isFile) { "${vocab.path} is missing: push the text encoder's vocab.txt there" }
            segmenter = Segmenter(folder, WordPieceTokenizer.fromVocabLines(vocab.readLines()))
            status.text = "Programs loaded from ${folder.path}"
        } catch (e: Exception) {
            status.text = e.message
        }
        findViewById<Button>(R.id.pick).setOnClickListener {
            picker.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
        }
        findViewById<Button>(R.id.segment).setOnClickListener { run(status) }
    }

    private fun run(status: TextView) {
        val model = segmenter ?: return
        val image = photo ?: run { status.text = "Choose a photo first."; return }
        val expression = findViewById<EditText>(R.id.expression).text.toString()
        status.text = "Running..."
        worker.execute {
            val message = try {
                val result = model.segment(image, expression, IMAGE_SIZE)
                runOnUiThread { findViewById<ImageView>(R.id.mask).setImageBitmap(Segmenter.overlay(result)) }
                "text %.1f ms, vision+fusion+decoder %.1f ms".format(result.textMs, result.visualMs)
            } catch (e: Exception) {
                e.message ?: e.toString()
            }
            runOnUiThread { status.text = message }
        }
    }

    override fun onDestroy() {
        segmenter?.close()
        worker.shutdown()
        super.onDestroy()
    }

    companion object {
        // lavt-tiny's input size; lavt-b programs take 480.
        const val IMAGE_SIZE = 128
    }
}
