plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.ptq4ris.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.ptq4ris.demo"
        minSdk = 28  // ImageDecoder
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a") }
    }
    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    // The .pte programs are memory-mapped from files: keep them uncompressed if you bundle them as assets.
    androidResources { noCompress += listOf("pte") }
}

dependencies {
    // Keep in step with the executorch version the programs were exported with (pyproject.toml pins 1.5.1).
    implementation("org.pytorch:executorch-android:1.5.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.activity:activity-ktx:1.9.3")
}
