// Checks WordPieceTokenizer against the golden cases on a desktop JVM:
//   kotlinc ../app/src/main/java/org/ptq4ris/demo/WordPieceTokenizer.kt GoldenCheck.kt -include-runtime -d check.jar
//   java -jar check.jar VOCAB_TXT CASES_TSV
// CASES_TSV: one case per line, "<20 comma-separated ids>\t<20 comma-separated mask values>\t<sentence as UTF-8 hex>"
// (tests/test_kotlin_tokenizer.py writes it from tests/golden/wordpiece.json). Exit status 1 on any mismatch.
import java.io.File
import kotlin.system.exitProcess
import org.ptq4ris.demo.WordPieceTokenizer

fun main(args: Array<String>) {
    if (args.size != 2) {
        System.err.println("usage: GoldenCheck VOCAB_TXT CASES_TSV")
        exitProcess(2)
    }
    val tokenizer = WordPieceTokenizer.fromVocabLines(File(args[0]).readLines(Charsets.UTF_8))
    var cases = 0
    var failures = 0
    for (line in File(args[1]).readLines(Charsets.UTF_8)) {
        if (line.isEmpty()) continue
        val (ids, mask, hex) = line.split('\t')
        val sentence = String(hex.chunked(2).map { it.toInt(16).toByte() }.toByteArray(), Charsets.UTF_8)
        val got = tokenizer.encode(sentence)
        cases += 1
        if (got.inputIds.joinToString(",") != ids || got.attentionMask.joinToString(",") != mask) {
            failures += 1
            if (failures <= 10) println("MISMATCH ${'"'}$sentence${'"'}: got ${got.inputIds.joinToString(",")} want $ids")
        }
    }
    println("cases=$cases failures=$failures")
    exitProcess(if (failures == 0) 0 else 1)
}
