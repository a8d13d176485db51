package org.ptq4ris.demo

import java.text.Normalizer

/**
 * Uncased BERT WordPiece as LAVT tokenizes an expression: [CLS] + word pieces + [SEP], cut to [maxTokens]
 * ([SEP] dropped when cut), padded with 0. Plain Kotlin (no Android API), so the same file is compiled and checked
 * on a desktop JVM against `tests/golden/wordpiece.json`, written with the transformers tokenizer.
 *
 * The normalisation follows the tokenizers library's BertNormalizer (clean text, space out CJK ideographs, strip
 * accents, lowercase) and BertPreTokenizer (split on whitespace and punctuation).
 */
class WordPieceTokenizer(private val vocab: Map<String, Int>, val maxTokens: Int = 20) {
    private val unk = id("[UNK]")
    private val cls = id("[CLS]")
    private val sep = id("[SEP]")

    class Encoding(val inputIds: IntArray, val attentionMask: IntArray)

    private fun id(token: String): Int =
        vocab[token] ?: throw IllegalArgumentException("vocab has no $token token: use the exported model's vocab.txt")

    fun encode(sentence: String): Encoding {
        require(sentence.isNotBlank()) { "The expression is empty: type a sentence naming the object to segment." }
        val ids = ArrayList<Int>()
        ids.add(cls)
        for (word in basicTokens(sentence)) ids.addAll(wordPieces(word))
        ids.add(sep)
        val kept = if (ids.size > maxTokens) ids.subList(0, maxTokens) else ids
        val inputIds = IntArray(maxTokens)
        val mask = IntArray(maxTokens)
        kept.forEachIndexed { i, v -> inputIds[i] = v; mask[i] = 1 }
        return Encoding(inputIds, mask)
    }

    internal fun basicTokens(text: String): List<String> {
        val cleaned = StringBuilder()
        text.codePoints().forEach { cp ->
            when {
                cp == 0 || cp == 0xFFFD || isControl(cp) -> {}
                isWhitespace(cp) -> cleaned.append(' ')
                isCjk(cp) -> cleaned.append(' ').appendCodePoint(cp).append(' ')
                else -> cleaned.appendCodePoint(cp)
            }
        }
        // Accents off (NFD, drop non-spacing marks), then lowercase code point by code point, as tokenizers does.
        val normalized = StringBuilder()
        Normalizer.normalize(cleaned, Normalizer.Form.NFD).codePoints().forEach { cp ->
            if (Character.getType(cp) != Character.NON_SPACING_MARK.toInt()) {
                normalized.appendCodePoint(Character.toLowerCase(cp))
            }
        }
        val tokens = ArrayList<String>()
        for (word in normalized.toString().split(' ')) {
            if (word.isEmpty()) continue
            val current = StringBuilder()
            word.codePoints().forEach { cp ->
                if (isPunctuation(cp)) {
                    if (current.isNotEmpty()) { tokens.add(current.toString()); current.setLength(0) }
                    tokens.add(String(Character.toChars(cp)))
                } else {
                    current.appendCodePoint(cp)
                }
            }
            if (current.isNotEmpty()) tokens.add(current.toString())
        }
        return tokens
    }

    /** Greedy longest-match-first over the vocabulary; a word that cannot be covered is one [UNK]. */
    internal fun wordPieces(word: String): List<Int> {
        val cps = word.codePoints().toArray()
        if (cps.size > MAX_CHARS_PER_WORD) return listOf(unk)
        val pieces = ArrayList<Int>()
        var start = 0
        while (start < cps.size) {
            var end = cps.size
            var found: Int? = null
            while (start < end) {
                val piece = (if (start > 0) "##" else "") + String(cps, start, end - start)
                found = vocab[piece]
                if (found != null) break
                end -= 1
            }
            if (found == null) return listOf(unk)
            pieces.add(found)
            start = end
        }
        return pieces
    }

    private fun isWhitespace(cp: Int): Boolean =
        cp == SPACE || cp == TAB || cp == LF || cp == CR ||
            Character.getType(cp) == Character.SPACE_SEPARATOR.toInt() || Character.isWhitespace(cp)

    private fun isControl(cp: Int): Boolean {
        if (cp == TAB || cp == LF || cp == CR) return false
        return when (Character.getType(cp)) {
            Character.CONTROL.toInt(), Character.FORMAT.toInt(), Character.PRIVATE_USE.toInt(),
            Character.UNASSIGNED.toInt(), Character.SURROGATE.toInt() -> true
            else -> false
        }
    }

    private fun isPunctuation(cp: Int): Boolean {
        if (cp in 33..47 || cp in 58..64 || cp in 91..96 || cp in 123..126) return true
        return when (Character.getType(cp)) {
            Character.CONNECTOR_PUNCTUATION.toInt(), Character.DASH_PUNCTUATION.toInt(),
            Character.START_PUNCTUATION.toInt(), Character.END_PUNCTUATION.toInt(),
            Character.INITIAL_QUOTE_PUNCTUATION.toInt(), Character.FINAL_QUOTE_PUNCTUATION.toInt(),
            Character.OTHER_PUNCTUATION.toInt() -> true
            else -> false
        }
    }

    private fun isCjk(cp: Int): Boolean =
        cp in 0x4E00..0x9FFF || cp in 0x3400..0x4DBF || cp in 0x20000..0x2A6DF || cp in 0x2A700..0x2B73F ||
            cp in 0x2B740..0x2B81F || cp in 0x2B820..0x2CEAF || cp in 0xF900..0xFAFF || cp in 0x2F800..0x2FA1F

    companion object {
        private const val MAX_CHARS_PER_WORD = 100
        private const val TAB = 9
        private const val LF = 10
        private const val CR = 13
        private const val SPACE = 32

        /** Reads `vocab.txt` (one token per line; the line number is the id). */
        fun fromVocabLines(lines: List<String>, maxTokens: Int = 20): WordPieceTokenizer {
            val vocab = HashMap<String, Int>(lines.size * 2)
            lines.forEachIndexed { i, token -> if (token.isNotEmpty()) vocab[token] = i }
            return WordPieceTokenizer(vocab, maxTokens)
        }
    }
}
