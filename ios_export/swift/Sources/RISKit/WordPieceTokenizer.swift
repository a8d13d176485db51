import Foundation

/// Uncased BERT WordPiece, as LAVT tokenizes an expression: [CLS] + word pieces + [SEP], cut to `maxTokens`
/// ([SEP] dropped when cut), padded with 0. Must reproduce `tests/golden/wordpiece.json` id for id.
public struct WordPieceTokenizer {
    public let maxTokens: Int
    private let vocab: [String: Int32]
    private let unk: Int32, cls: Int32, sep: Int32
    private static let maxCharsPerWord = 100

    public enum TokenizerError: Error, LocalizedError {
        case emptyExpression
        case missingToken(String)
        public var errorDescription: String? {
            switch self {
            case .emptyExpression: return "The expression is empty: type a sentence naming the object to segment."
            case .missingToken(let t): return "vocab.txt has no \(t) token: use the vocab of the exported model."
            }
        }
    }

    /// - Parameter vocabURL: `vocab.txt` of the text encoder (one token per line, line number = id).
    public init(vocabURL: URL, maxTokens: Int = 20) throws {
        let lines = try String(contentsOf: vocabURL, encoding: .utf8).components(separatedBy: "\n")
        var vocab = [String: Int32]()
        for (i, line) in lines.enumerated() where !line.isEmpty { vocab[line] = Int32(i) }
        try self.init(vocab: vocab, maxTokens: maxTokens)
    }

    public init(vocab: [String: Int32], maxTokens: Int = 20) throws {
        func id(_ t: String) throws -> Int32 {
            guard let v = vocab[t] else { throw TokenizerError.missingToken(t) }
            return v
        }
        self.vocab = vocab
        self.maxTokens = maxTokens
        unk = try id("[UNK]"); cls = try id("[CLS]"); sep = try id("[SEP]")
    }

    /// `input_ids` and `attention_mask`, each `maxTokens` long.
    public func encode(_ sentence: String) throws -> (ids: [Int32], mask: [Int32]) {
        guard !sentence.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else {
            throw TokenizerError.emptyExpression
        }
        var ids: [Int32] = [cls]
        for word in basicTokens(sentence) { ids += wordPieces(word) }
        ids.append(sep)
        if ids.count > maxTokens { ids = Array(ids.prefix(maxTokens)) }
        let mask = [Int32](repeating: 1, count: ids.count) + [Int32](repeating: 0, count: maxTokens - ids.count)
        return (ids + [Int32](repeating: 0, count: maxTokens - ids.count), mask)
    }

    // MARK: - BERT's basic tokenizer: clean, space out CJK, lowercase, strip accents, split on whitespace/punctuation

    func basicTokens(_ text: String) -> [String] {
        var cleaned = String.UnicodeScalarView()
        for s in text.unicodeScalars {
            if s.value == 0 || s.value == 0xFFFD || isControl(s) { continue }
            if isWhitespace(s) { cleaned.append(" "); continue }
            if isCJK(s) { cleaned.append(" "); cleaned.append(s); cleaned.append(" "); continue }
            cleaned.append(s)
        }
        // Accents off (NFD, drop non-spacing marks), then lowercase scalar by scalar, as the tokenizers library does.
        var normalized = String.UnicodeScalarView()
        for s in String(cleaned).decomposedStringWithCanonicalMapping.unicodeScalars
        where s.properties.generalCategory != .nonspacingMark {
            normalized.append(contentsOf: s.properties.lowercaseMapping.unicodeScalars)
        }
        var tokens: [String] = []
        for word in String(normalized).split(separator: " ", omittingEmptySubsequences: true) {
            var current = String.UnicodeScalarView()
            for s in word.unicodeScalars {
                if isPunctuation(s) {
                    if !current.isEmpty { tokens.append(String(current)); current = String.UnicodeScalarView() }
                    tokens.append(String(s))
                } else {
                    current.append(s)
                }
            }
            if !current.isEmpty { tokens.append(String(current)) }
        }
        return tokens
    }

    // Greedy longest-match-first over the vocabulary; a word that cannot be covered is one [UNK].
    func wordPieces(_ word: String) -> [Int32] {
        let chars = Array(word.unicodeScalars)
        if chars.count > Self.maxCharsPerWord { return [unk] }
        var pieces: [Int32] = []
        var start = 0
        while start < chars.count {
            var end = chars.count
            var found: Int32?
            while start < end {
                var piece = String(String.UnicodeScalarView(chars[start..<end]))
                if start > 0 { piece = "##" + piece }
                if let id = vocab[piece] { found = id; break }
                end -= 1
            }
            guard let id = found else { return [unk] }
            pieces.append(id)
            start = end
        }
        return pieces
    }

    private func isWhitespace(_ s: Unicode.Scalar) -> Bool {
        s == " " || s == "\t" || s == "\n" || s == "\r" || s.properties.generalCategory == .spaceSeparator
            || s.properties.isWhitespace
    }

    // Unicode's "other" categories, as BERT's text cleaning removes them.
    private func isControl(_ s: Unicode.Scalar) -> Bool {
        if s == "\t" || s == "\n" || s == "\r" { return false }
        switch s.properties.generalCategory {
        case .control, .format, .privateUse, .unassigned, .surrogate: return true
        default: return false
        }
    }

    private func isPunctuation(_ s: Unicode.Scalar) -> Bool {
        let v = s.value
        if (33...47).contains(v) || (58...64).contains(v) || (91...96).contains(v) || (123...126).contains(v) {
            return true
        }
        switch s.properties.generalCategory {
        case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
             .initialPunctuation, .finalPunctuation, .otherPunctuation:
            return true
        default:
            return false
        }
    }

    private func isCJK(_ s: Unicode.Scalar) -> Bool {
        let v = s.value
        return (0x4E00...0x9FFF).contains(v) || (0x3400...0x4DBF).contains(v) || (0x20000...0x2A6DF).contains(v)
            || (0x2A700...0x2B73F).contains(v) || (0x2B740...0x2B81F).contains(v) || (0x2B820...0x2CEAF).contains(v)
            || (0xF900...0xFAFF).contains(v) || (0x2F800...0x2FA1F).contains(v)
    }
}
