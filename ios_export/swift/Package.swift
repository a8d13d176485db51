// swift-tools-version:5.9
// RISKit: tokenize an expression as LAVT does, run a ptq4ris Core ML package, overlay the mask.
// RISDemo: a SwiftUI screen using it (add it to an iOS app target; Xcode 15+, iOS 17+).
import PackageDescription

let package = Package(
    name: "RISKit",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [
        .library(name: "RISKit", targets: ["RISKit"]),
        .library(name: "RISDemo", targets: ["RISDemo"]),
    ],
    targets: [
        .target(name: "RISKit"),
        .target(name: "RISDemo", dependencies: ["RISKit"]),
        .testTarget(name: "RISKitTests", dependencies: ["RISKit"]),
    ]
)
